"""Per-module recipes: `overrides` resolve into the per-linear plan, change only the matched linears,
and the size is accounted per linear (codes at their bits + 16-bit scales)."""
from __future__ import annotations

import copy

import pytest
import torch
import yaml
from conftest import tiny_model

from quantbench.core.errors import QuantbenchError
from quantbench.quant.apply import apply_recipe, prepare
from quantbench.quant.primitives import quantize_weight
from quantbench.quant.qlinear import QuantLinear
from quantbench.quant.recipes import PRESETS, resolve_recipe
from quantbench.quant.spec import QuantSpec

W8 = QuantSpec(bits=8, granularity="channel")


def _bits_w4g(o: int, i: int, g: int) -> float:
    return 4 * o * i + 16 * o * (i // g)  # int4 codes + one fp16 scale per group (symmetric: no zeros)


def _bits_w8ch(o: int, i: int) -> float:
    return 8 * o * i + 16 * o  # int8 codes + one fp16 scale per row


def _override(base: str, names: list[str], **spec) -> object:
    return resolve_recipe({"preset": base, "name": f"{base}-keep8",
                           "overrides": [{"match": n, "weights": W8.model_dump(), **spec} for n in names]})


def _check_only_named_layers_differ(m, base, mixed, names, calib):
    qa, a = apply_recipe(copy.deepcopy(m), base, calib)
    qb, b = apply_recipe(copy.deepcopy(m), mixed, calib)
    diff = {n for n in a.plan.linears if a.plan.linears[n] != b.plan.linears[n]}
    assert diff == set(names)
    fp = dict(m.named_modules())
    for n, lp in b.plan.linears.items():
        la, lb = qa.get_submodule(n), qb.get_submodule(n)
        assert isinstance(la, QuantLinear) and isinstance(lb, QuantLinear)
        o, i = lb.weight.shape
        if n in names:
            expected = quantize_weight(fp[n].weight.data, W8).dequantize(lb.weight.dtype)
            assert torch.equal(lb.weight, expected) and not torch.equal(la.weight, lb.weight)
            assert b.size.per_linear[n] == _bits_w8ch(o, i)
        else:
            assert torch.equal(la.weight, lb.weight)
            assert b.size.per_linear[n] == a.size.per_linear[n] == _bits_w4g(o, i, base.weights.group_size)
    extra = sum(_bits_w8ch(*fp[n].weight.shape) - _bits_w4g(*fp[n].weight.shape, base.weights.group_size) for n in names)
    assert b.size.total_bits - a.size.total_bits == extra
    return qa, qb


def test_overrides_match_exact_suffix_glob_and_regex():
    m = tiny_model("llama")
    r = resolve_recipe({"preset": "w4a16-g64", "name": "mix", "overrides": [
        {"match": "model.layers.0.mlp.down_proj", "weights": W8.model_dump()},   # exact
        {"match": "layers.1.self_attn.o_proj", "weights": W8.model_dump()},       # dotted suffix
        {"match": "model.layers.*.self_attn.k_proj", "weights": None},           # glob, null = full precision
        {"match": "re:model\\.layers\\.1\\.mlp\\.(gate|up)_proj", "activations": QuantSpec(bits=8, granularity="token").model_dump()},
    ]})
    plan = prepare(m, r).linears
    assert plan["model.layers.0.mlp.down_proj"].weights == W8
    assert plan["model.layers.1.self_attn.o_proj"].weights == W8
    assert plan["model.layers.0.self_attn.k_proj"].weights is None and plan["model.layers.1.self_attn.k_proj"].weights is None
    assert plan["model.layers.1.mlp.up_proj"].activations.bits == 8 and plan["model.layers.0.mlp.up_proj"].activations is None
    untouched = plan["model.layers.0.self_attn.q_proj"]
    assert untouched.weights == PRESETS["w4a16-g64"].weights and untouched.activations is None


def test_override_of_a_missing_layer_is_one_clear_error():
    m = tiny_model("llama")
    r = _override("w4a16-g64", ["model.layers.7.mlp.down_proj"])
    with pytest.raises(QuantbenchError, match="names no linear layer"):
        prepare(m, r)


def test_tiny_model_override_changes_only_those_layers(tokens):
    m = tiny_model("llama", hidden=128)
    names = ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.v_proj"]
    _check_only_named_layers_differ(m, PRESETS["w4a16-g64"], _override("w4a16-g64", names), names, tokens)


@pytest.mark.integration
def test_census_named_layers_kept_in_8_bit_on_the_default_model(default_lm, wiki):
    """The census names the down_proj that writes the massive activation and the one that cancels it;
    keeping exactly those in 8 bits changes only them, and the size grows by exactly their bits."""
    from quantbench.census import run_census
    from quantbench.data.corpus import calibration_batches
    from quantbench.run.config import CensusConfig

    model, tok = default_lm.model, default_lm.tokenizer
    ids = calibration_batches(tok, wiki.calib_text, 2, 64, 0)
    census = run_census(model, ids, tok, CensusConfig(plots=False, linear_inputs=False), batch_size=2)
    layers = sorted({L for d in census["lifecycle"] for L in (d["emerges"], d["disappears"]) if L is not None})
    names = [f"model.layers.{L}.mlp.down_proj" for L in layers]
    assert "model.layers.11.mlp.down_proj" in names  # the documented writer of dims 247/507
    qa, qb = _check_only_named_layers_differ(model, PRESETS["w4a16-g64"], _override("w4a16-g64", names), names, ids)
    with torch.no_grad():
        err = [(q(input_ids=ids).logits - model(input_ids=ids).logits).pow(2).mean().item() for q in (qa, qb)]
    assert err[1] < err[0]  # spending bits where the census points helps


@pytest.mark.parametrize("where", ["override", "exclude"])
def test_a_regex_that_does_not_compile_is_a_config_error(where, tmp_path, capsys):
    """'re:(' was a traceback from re.compile mid-run (exit 1); now the config is refused in one line."""
    from reliability_common import assert_error, cli

    bad = {"preset": "w4a16-g64", "name": "bad"}
    bad.update({"overrides": [{"match": "re:layers.(0", "weights": None}]} if where == "override"
               else {"exclude": ["re:lm_head[", "lm_head"]})
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"model": str(tmp_path / "nowhere"), "recipes": ["fp", bad]}))
    assert_error(cli(capsys, "run", "-c", cfg), "is not a valid regular expression")
