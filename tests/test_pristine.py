"""Recipes quantize the loaded model in place and quantbench.modeling.pristine puts it back exactly: after any
preset is applied and restored, every parameter, buffer, module type, tie, hook and config value equals
a deep copy taken before (the independent reference), and a sweep's rows equal the deep-copy path's."""
from __future__ import annotations

import copy

import pytest
import torch
import transformers as tf
from test_pipeline import _cfg, text_file, tiny_dir  # noqa: F401  (fixtures)

from quantbench.core.errors import QuantbenchError
from quantbench.modeling.load import load_model
from quantbench.modeling.pristine import Pristine
from quantbench.quant.apply import apply_recipe
from quantbench.quant.plugin import BackendUnavailable
from quantbench.quant.recipes import PRESETS
from quantbench.run import cell, pipeline

_HOOKS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
          "_backward_hooks", "_backward_pre_hooks")


def _tied_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True)
    cfg._attn_implementation = "eager"
    m = tf.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms off 1 so that folding them (rotation) changes weights
        for n, p in m.named_parameters():
            if "norm" in n:
                p.mul_(1 + 0.3 * torch.rand_like(p))
    return m


def _assert_same(model: torch.nn.Module, ref: torch.nn.Module) -> None:
    """model equals ref (a deep copy taken before any recipe) in every way a recipe can change it."""
    got = dict(model.named_parameters(remove_duplicate=False))
    want = dict(ref.named_parameters(remove_duplicate=False))
    assert got.keys() == want.keys()
    for n in want:
        assert got[n].dtype == want[n].dtype and torch.equal(got[n], want[n]), n
    gb, wb = dict(model.named_buffers(remove_duplicate=False)), dict(ref.named_buffers(remove_duplicate=False))
    assert gb.keys() == wb.keys() and all(torch.equal(gb[n], wb[n]) for n in wb)
    assert {n: type(m) for n, m in model.named_modules()} == {n: type(m) for n, m in ref.named_modules()}
    for (n, m), (_, r) in zip(model.named_modules(), ref.named_modules()):
        for h in _HOOKS:
            assert len(getattr(m, h)) == len(getattr(r, h)), (n, h)
        assert set(vars(m)) == set(vars(r)), n  # no attribute added or removed
    tied = lambda x: x.lm_head.weight is x.model.embed_tokens.weight  # noqa: E731
    assert tied(model) == tied(ref)
    assert model.config.to_dict() == ref.config.to_dict()


def _presets():
    return [n for n in PRESETS.names() if n not in ("fp", "as-loaded")]


def test_every_preset_is_undone_exactly(tokens):
    model = _tied_llama()
    ref = copy.deepcopy(model)
    x = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fp_logits = model(x).logits
    pr = Pristine(model)
    applied = 0
    for name in _presets():
        try:
            qmodel, _ = apply_recipe(model, PRESETS.get(name), tokens)
            with torch.no_grad():
                qmodel(x)  # the hooks a recipe installed run once
            applied += 1
        except (QuantbenchError, BackendUnavailable):
            pass  # not applicable to this model (e.g. group 128 > 64 inputs) or this machine
        finally:
            pr.restore()
        _assert_same(model, ref)
        with torch.no_grad():
            assert torch.equal(model(x).logits, fp_logits), name
    assert applied >= 20  # the presets that can run here did run


def test_values_are_read_back_from_the_model_files(tiny_dir):  # noqa: F811
    lm = load_model(str(tiny_dir), device="cpu", dtype="float32")
    ref = copy.deepcopy(lm.model)
    pr = Pristine(lm.model, lm.folder)
    n_bytes = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    assert pr.file_bytes == n_bytes  # every parameter comes from the file, none is cloned
    for name in ("w8a8-tensor-static-rot", "w4a16-g64-gptq", "w8a8-tensor-static-sq-ot"):
        apply_recipe(lm.model, PRESETS.get(name), torch.randint(3, 1000, (2, 16)))
        linears = sum(m.weight.numel() * 4 for n, m in ref.named_modules() if n.endswith("_proj"))
        assert pr.released_bytes >= linears  # the replaced FP weights were freed, not held beside the new ones
        pr.restore()
        _assert_same(lm.model, ref)


_RECIPES = ("fp", "w8a8-tensor-static", "w8a8-tensor-static-rot", "w4a16-g64-gptq", "w4a16-g64-awq",
            "w8a8-tensor-static-sq-ot", "w8a8-tensor-dynamic-int8", "quanto-w8")


def _metrics(rows: dict) -> dict:
    return {k: {f: v for f, v in r.items() if not f.endswith("_s") and f not in ("calib_stats_reused", "peak_mem_mb")}
            for k, r in rows.items()}


def test_rows_equal_the_deepcopy_path(tiny_dir, text_file, tmp_path, monkeypatch):  # noqa: F811
    cfg = _cfg(tiny_dir, text_file, tmp_path / "inplace", recipes=_RECIPES)
    inplace = pipeline.load_rows(pipeline.run(cfg) / "rows.jsonl")
    monkeypatch.setattr(cell, "capture_pristine", lambda lm: None)  # every recipe on a deep copy
    cfg = _cfg(tiny_dir, text_file, tmp_path / "copy", recipes=_RECIPES)
    copied = pipeline.load_rows(pipeline.run(cfg) / "rows.jsonl")
    assert all(r["status"] == "ok" for r in inplace.values())
    assert _metrics(inplace) == _metrics(copied)
