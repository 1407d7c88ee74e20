"""accelerate device maps (config `placement:`): a tiny model with a forced CPU/disk-offload map gives
the same rows as the model loaded whole; a recipe on an offloaded model is undone exactly; bad maps
are one-line errors."""
from __future__ import annotations

import pytest
import torch

from quantbench import pipeline
from quantbench.config import parse_config
from quantbench.errors import ConfigError, QuantbenchError
from quantbench.models import load_model
from quantbench.offload import is_offloaded, offloaded_modules
from quantbench.pristine import Pristine
from quantbench.quant.apply import apply_recipe
from quantbench.quant.recipes import PRESETS

from test_pipeline import _cfg, text_file, tiny_dir  # noqa: F401  (fixtures)

RECIPES = ("fp", "w8a8-tensor-static", "w8a8-tensor-static-rot", "w4a16-g64-gptq")


def _offload_map() -> dict:
    """Layer 0 on the CPU, layer 1 and lm_head offloaded to disk (what a model larger than memory gets)."""
    return {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
            "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "disk"}


def _with(cfg, **placement):
    return parse_config({**cfg.model_dump(mode="json"), "placement": placement})


def _metrics(rows: dict) -> dict:
    return {k: {f: r[f] for f in ("status", "ppl", "kl", "top1", "bits_per_weight", "size_mb", "n_tokens")
                if f in r} for k, r in rows.items()}


def test_offloaded_model_gives_the_rows_of_the_whole_model(tiny_dir, text_file, tmp_path):  # noqa: F811
    whole = pipeline.load_rows(pipeline.run(_cfg(tiny_dir, text_file, tmp_path / "whole", RECIPES)) / "rows.jsonl")
    cfg = _with(_cfg(tiny_dir, text_file, tmp_path / "mapped", RECIPES), device_map=_offload_map(),
                offload_folder=str(tmp_path / "offload"))
    assert cfg.fingerprint() == _cfg(tiny_dir, text_file, tmp_path, RECIPES).fingerprint()  # placement is not a result
    mapped = pipeline.load_rows(pipeline.run(cfg) / "rows.jsonl")
    assert all(r["status"] == "ok" for r in mapped.values())
    assert _metrics(mapped) == _metrics(whole)
    assert {r["inputs_key"] for r in mapped.values()} == {r["inputs_key"] for r in whole.values()}


def test_auto_map_with_max_memory_offloads_and_matches(tiny_dir, tmp_path):  # noqa: F811
    whole = load_model(str(tiny_dir), device="cpu")
    lm = load_model(str(tiny_dir), device="cpu", placement={
        "device_map": "auto", "max_memory": {"cpu": 2_000_000}, "offload_folder": str(tmp_path / "off")})
    assert is_offloaded(lm.model) and "disk" in lm.info["device_map"].values()
    assert lm.info["fingerprint"] == whole.info["fingerprint"]
    x = torch.randint(3, 1000, (2, 16))
    with torch.no_grad():
        assert torch.equal(lm.model(x).logits, whole.model(x).logits)


def test_recipe_on_offloaded_model_is_undone(tiny_dir, tmp_path):  # noqa: F811
    lm = load_model(str(tiny_dir), device="cpu", placement={"device_map": _offload_map(),
                                                           "offload_folder": str(tmp_path / "off")})
    x = torch.randint(3, 1000, (2, 16))
    with torch.no_grad():
        before = lm.model(x).logits
    n_off = len(offloaded_modules(lm.model))
    pr = Pristine(lm.model, lm.folder)
    from quantbench.offload import onload

    onload(lm.model)
    assert not is_offloaded(lm.model)
    apply_recipe(lm.model, PRESETS.get("w8a8-tensor-static-rot"), x)
    pr.restore()
    assert is_offloaded(lm.model) and len(offloaded_modules(lm.model)) == n_off
    assert all(p.device.type == "meta" for n, p in lm.model.named_parameters() if n.startswith("model.layers.1."))
    with torch.no_grad():
        assert torch.equal(lm.model(x).logits, before)


@pytest.mark.parametrize("placement, words", [
    ({"device_map": {"model.nope": "cpu", "": "cpu"}}, "'model.nope' is not a module"),
    ({"device_map": {"model.embed_tokens": "cpu"}}, "no entry places"),
    ({"device_map": {"": "gpu"}}, "cannot place model"),
    ({"device_map": "everywhere"}, "cannot place model"),
])
def test_bad_maps_are_one_line(tiny_dir, placement, words):  # noqa: F811
    with pytest.raises(QuantbenchError) as e:
        load_model(str(tiny_dir), device="cpu", placement=placement)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_max_memory_needs_an_automatic_map(tiny_dir, text_file, tmp_path):  # noqa: F811
    with pytest.raises(ConfigError, match="max_memory needs device_map"):
        _with(_cfg(tiny_dir, text_file, tmp_path), max_memory={"cpu": "1GiB"})
