"""accelerate device maps (config `placement:`): a tiny model with a forced CPU/disk-offload map gives
the same rows as the model loaded whole; a recipe on an offloaded model is undone exactly; bad maps
are one-line errors."""
from __future__ import annotations

import pytest
import torch
from reliability_common import env  # noqa: F401  (fixture)
from test_pipeline import _cfg, text_file, tiny_dir  # noqa: F401  (fixtures)

from quantbench.core.errors import ConfigError, QuantbenchError
from quantbench.modeling.load import load_model
from quantbench.modeling.offload import is_offloaded, offloaded_modules
from quantbench.modeling.pristine import Pristine
from quantbench.modeling.surgery import model_device
from quantbench.quant.apply import apply_recipe
from quantbench.quant.recipes import PRESETS
from quantbench.run import pipeline
from quantbench.run.config import parse_config

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
    from quantbench.modeling.offload import onload

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


# ---------------------------------------------------------------- issue 21: disk maps through the CLI, the doc's maps
ROW_FIELDS = ("status", "ppl", "kl", "top1", "bits_per_weight", "size_mb", "n_tokens")


def _cli_rows(capsys, root, model, corpus, **over) -> dict:
    from reliability_common import cli, rows_by_recipe, write_config

    root.mkdir()
    res = cli(capsys, "run", "-c", write_config(root, model, corpus, **over))
    assert res.rc == 0, res.err[-3000:]
    return {k: {f: r.get(f) for f in ROW_FIELDS} for k, r in rows_by_recipe(root / "out" / "r").items()}


@pytest.mark.parametrize("device_map", [
    # the map: '' places the rest beside a disk entry (accelerate took '' only alone)
    {"model.embed_tokens": "cpu", "model.layers.0": "disk", "": "cpu"},
    # the input embedding on disk: the model's first parameter is on meta (the FP evaluation sent its ids there)
    {"model.embed_tokens": "disk", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu",
     "model.rotary_emb": "cpu", "lm_head": "disk"},
])
def test_disk_map_runs_end_to_end_with_the_rows_of_the_whole_model(capsys, tmp_path, tmp_path_factory, device_map):
    """census, FP evaluation, W8A8 and W4 recipes (GPTQ too) and a mixed recipe (sensitivities, validation,
    refinement) on a model partly on disk: every row equals the model loaded whole."""
    from reliability_common import corpus_text, tiny_model

    model, corpus = tiny_model(tmp_path_factory), tmp_path / "corpus.txt"
    corpus.write_text(corpus_text())
    over = {"census": {"enabled": True}, "recipes": ["fp", "w8a8-tensor-static", "w4a16-channel", "w4a16-channel-gptq"],
            "mixed": [{"base": "w4a16-channel", "max_kept": 2, "samples": 1, "validate_layers": 2, "refine": 1}]}
    whole = _cli_rows(capsys, tmp_path / "whole", model, corpus, **over)
    mapped = _cli_rows(capsys, tmp_path / "mapped", model, corpus, **over,
                       placement={"device_map": device_map, "offload_folder": str(tmp_path / "offload")})
    assert (tmp_path / "mapped" / "out" / "r" / "census.json").exists()
    assert set(mapped) == {"fp", "w8a8-tensor-static", "w4a16-channel", "w4a16-channel-gptq", "mixed-w4a16-channel-k2-r1"}
    assert all(r["status"] == "ok" for r in mapped.values()) and mapped == whole


@pytest.mark.parametrize("placement, words", [
    ({"device_map": {"": "gpu"}}, "unknown device 'gpu'"),
    ({"device_map": {"model.layers.0": "disk", "": "cpu"}}, "'model.layers.0' goes to disk, which needs offload_folder"),
    ({"device_map": {"model.layers.0": "disk", "model.layers.0.mlp": "cpu", "": "cpu"}, "offload_folder": "off"},
     "'model.layers.0.mlp' lies inside 'model.layers.0'"),
    ({"device_map": "everywhere"}, "'everywhere' is neither auto"),
    ({"device_map": "auto", "max_memory": {"gpu0": "1GiB"}}, "max_memory: unknown device 'gpu0'"),
])
def test_a_map_accelerate_cannot_take_is_one_line_before_any_work(capsys, env, placement, words):
    from reliability_common import assert_error, cli, write_config

    root, model, corpus = env
    assert_error(cli(capsys, "run", "-c", write_config(root, model, corpus, placement=placement)),
                 "config: placement: device_map" if "max_memory" not in words else "config: placement:", words)
    assert not (root / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU a map names exists here")
def test_a_gpu_this_machine_lacks_is_one_line(capsys, env):
    from reliability_common import assert_error, cli, write_config

    root, model, corpus = env
    for placement in ({"device_map": {"": 0}}, {"device_map": "auto", "max_memory": {0: "70GiB", "cpu": "2GiB"}}):
        assert_error(cli(capsys, "run", "-c", write_config(root, model, corpus, placement=placement)),
                     "names GPU 0, but torch sees no CUDA devices here")
        assert not (root / "out").exists()


def _doc_placements() -> list[dict]:
    """The `placement:` of every YAML example in docs/scale.md."""
    import re
    from pathlib import Path

    import yaml

    text = (Path(__file__).resolve().parents[1] / "docs" / "scale.md").read_text()
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", text, re.S)]
    return [b["placement"] for b in blocks if isinstance(b, dict) and "placement" in b]


def test_every_placement_example_in_the_docs_is_accepted(tiny_dir, tmp_path):  # noqa: F811
    """Each map docs/scale.md shows parses through PlacementConfig and places the tiny model (the same
    logits as loaded whole), or, naming a GPU this machine lacks, is refused in our one line."""
    from quantbench.run.config import PlacementConfig, validate

    examples = _doc_placements()
    assert len(examples) >= 2 and any(isinstance(e["device_map"], dict) and "disk" in e["device_map"].values()
                                      for e in examples)
    whole = load_model(str(tiny_dir), device="cpu")
    x = torch.randint(3, 1000, (2, 16))
    for i, e in enumerate(examples):
        pc = validate(PlacementConfig, e)
        kw = {**pc.load_kwargs(), **({"offload_folder": str(tmp_path / f"off{i}")} if pc.offload_folder else {})}
        gpus = [d for d in [*(pc.device_map.values() if isinstance(pc.device_map, dict) else [pc.device_map]),
                            *(pc.max_memory or {})] if isinstance(d, int) or str(d).startswith("cuda")]
        if gpus and not torch.cuda.is_available():
            with pytest.raises(QuantbenchError, match="names GPU .*, but torch sees no CUDA devices"):
                load_model(str(tiny_dir), device="cpu", placement=kw)
            continue
        lm = load_model(str(tiny_dir), device="cpu", placement=kw)
        with torch.no_grad():
            assert torch.equal(lm.model(x.to(model_device(lm.model))).logits.cpu(), whole.model(x).logits), e
