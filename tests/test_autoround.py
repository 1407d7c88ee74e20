"""autoround (SignRound: signed-gradient rounding offsets and min-max tuning, block by block) against
independent references: round-to-nearest written out here from compressed-tensors' formulas, the grids
checked with compressed-tensors' own quantize / dequantize / fake_quantize, and the block outputs of the
FP model. auto-round 0.16.1 itself is not a dependency; the comparison with it on a tiny Llama is in
docs/quantization.md ("AutoRound")."""
from __future__ import annotations

import copy

import compressed_tensors.quantization.lifecycle.forward as ct
import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs, preset_name_to_scheme
from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam
from conftest import tiny_model

from quantbench.quant.apply import apply_recipe
from quantbench.quant.mitigations.autoround import Rounder
from quantbench.quant.qlinear import QuantLinear
from quantbench.quant.recipes import PRESETS
from quantbench.quant.spec import MitigationSpec, QuantSpec, Recipe

W4 = {True: QuantSpec(bits=4, granularity="group", group_size=64),
      False: QuantSpec(bits=4, granularity="group", group_size=64, symmetric=False)}


def ref_rtn(w: torch.Tensor, bits: int, group: int, symmetric: bool) -> torch.Tensor:
    """Round-to-nearest per group, compressed-tensors' int grid written out: signed codes
    [-2^(b-1), 2^(b-1)-1]; symmetric scale max|w| / ((qmax-qmin)/2), asymmetric (hi-lo)/(qmax-qmin) with an
    integer zero point; 0 always in the range; round half to even; a zero scale (an all-zero group) becomes
    finfo.eps and its undefined (0/0) zero point 0."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    wb = w.reshape(w.shape[0], -1, group)
    lo, hi = wb.amin(-1, keepdim=True).clamp_max(0), wb.amax(-1, keepdim=True).clamp_min(0)
    if symmetric:
        s, z = torch.maximum(-lo, hi) / torch.tensor((qmax - qmin) / 2), torch.zeros_like(lo)
    else:
        s = (hi - lo) / torch.tensor(float(qmax - qmin))
        z = torch.round(torch.nan_to_num(torch.clamp(qmin - lo / s, qmin, qmax), nan=0.0))
    s = torch.where(s == 0, torch.finfo(s.dtype).eps, s)
    q = torch.round(torch.clamp(wb / s + z, qmin, qmax))
    return ((q - z) * s).reshape(w.shape)


def _int_args(symmetric: bool) -> QuantizationArgs:
    return QuantizationArgs(num_bits=4, symmetric=symmetric, strategy="group", group_size=64)


def _layer_outputs(model, tokens) -> list[torch.Tensor]:
    outs, hooks = [], [layer.register_forward_hook(lambda m, a, o: outs.append(o[0] if isinstance(o, tuple) else o))
                       for layer in model.model.layers]
    with torch.no_grad():
        model(input_ids=tokens)
    for h in hooks:
        h.remove()
    return outs


def _block_errors(model, fp_outs, tokens) -> list[float]:
    """Each decoder layer's output error against the FP model's (the SignRound objective, on every token)."""
    return [float((a - b).pow(2).mean()) for a, b in zip(_layer_outputs(model, tokens), fp_outs)]


def _with_weights(model, fn) -> torch.nn.Module:
    """A copy of model whose decoder-layer linears hold fn(weight)."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for name, mod in m.named_modules():
            if name.startswith("model.layers.") and isinstance(mod, torch.nn.Linear):
                mod.weight.copy_(fn(mod.weight))
    return m


def _autoround(spec: QuantSpec, **options) -> Recipe:
    opts = {"batch_size": 4, "calib_samples": 8, **options}
    return Recipe(name="ar", weights=spec, mitigations=(MitigationSpec(name="autoround", options=opts),))


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("llama", hidden=128)  # 2 layers, inputs 128 / 256 wide: 2 or 4 groups of 64 per row
    tokens = torch.randint(3, 128, (8, 64), generator=torch.Generator().manual_seed(0))
    tokens[:, 0] = 1  # a BOS-like first token, as calibration batches have
    return model, tokens, _layer_outputs(model, tokens)


@pytest.mark.parametrize("symmetric", [True, False])
def test_zero_offsets_are_round_to_nearest_and_compressed_tensors_grid(symmetric):
    torch.manual_seed(0)
    w = torch.randn(48, 256) * 0.05
    w[3], w[5, :64] = 0.0, 0.0  # an all-zero row and group
    r = Rounder(w, W4[symmetric])
    qt = r.qtensor(*r.params())
    assert torch.equal(r.qdq(*r.params()), ref_rtn(w, 4, 64, symmetric))
    args = _int_args(symmetric)
    v = w.unflatten(-1, (-1, 64)).unsqueeze(0)
    scale, zero = calculate_qparams(v.amin(dim=(0, -1)), v.amax(dim=(0, -1)), args)
    assert torch.equal(qt.scale, scale) and torch.equal(qt.zero_point.float(), zero.float())
    assert torch.equal(qt.codes, ct.quantize(w, scale, zero, args, dtype=torch.int8))


@pytest.mark.parametrize("preset, theirs", [("nvfp4a16", "NVFP4A16"), ("mxfp4a16", "MXFP4A16")])
def test_zero_offsets_are_compressed_tensors_fp4(preset, theirs):
    torch.manual_seed(1)
    w = torch.randn(32, 128) * 0.05
    w[2, 7] = 1.0  # an outlier
    args = preset_name_to_scheme(theirs, ["Linear"]).weights
    v = w.unflatten(-1, (-1, args.group_size)).unsqueeze(0)
    gs = generate_gparam(w.amin(), w.amax()).reshape(1) if preset == "nvfp4a16" else None
    scale, zero = calculate_qparams(v.amin(dim=(0, -1)), v.amax(dim=(0, -1)), args, global_scale=gs)
    r = Rounder(w, PRESETS.get(preset).weights)
    qt = r.qtensor(*r.params())
    assert torch.equal(r.qdq(*r.params()), ct.fake_quantize(w, scale, zero, args, global_scale=gs))
    assert torch.equal(qt.scale, scale) and torch.equal(qt.codes, ct.quantize(w, scale, zero, args, global_scale=gs))


def test_no_iterations_is_the_round_to_nearest_recipe(setup):
    model, tokens, _ = setup
    rtn, _ = apply_recipe(copy.deepcopy(model), PRESETS.get("w4a16-g64"), tokens)
    ar, applied = apply_recipe(copy.deepcopy(model), _autoround(W4[True], iters=0), tokens)
    assert applied.notes["autoround_layers"] == 14 and applied.notes["autoround_err_vs_rtn"] == 1.0
    with torch.no_grad():
        assert torch.equal(ar(input_ids=tokens).logits, rtn(input_ids=tokens).logits)


@pytest.mark.parametrize("symmetric", [True, False])
def test_tuned_weights_lie_on_the_int_grid_and_beat_round_to_nearest(setup, symmetric):
    model, tokens, fp_outs = setup
    q, applied = apply_recipe(copy.deepcopy(model), _autoround(W4[symmetric], iters=40), tokens)
    args, changed, total = _int_args(symmetric), 0, 0
    for name, mod in q.named_modules():
        if not isinstance(mod, QuantLinear) or mod.qweight is None:
            continue
        qt, w = mod.qweight, mod.weight.data  # the codes the recipe stores, the weights it computes with
        assert qt.codes.dtype == torch.int8 and int(qt.codes.min()) >= -8 and int(qt.codes.max()) <= 7, name
        assert torch.equal(ct.dequantize(qt.codes, qt.scale, qt.zero_point, args), w), name
        assert torch.equal(ct.quantize(w, qt.scale, qt.zero_point, args, dtype=torch.int8), qt.codes), name
        assert torch.equal(ct.fake_quantize(w, qt.scale, qt.zero_point, args), w), name  # grid points
        # the tuned ranges: between half and all of each group's min-max range (the factors' bounds)
        orig = model.get_submodule(name).weight.data
        ratio = qt.scale / _rtn_scale(orig, symmetric)
        assert float(ratio.min()) >= 0.5 - 1e-6 and float(ratio.max()) <= 1.0 + 1e-6, name
        rtn_codes = ct.quantize(orig, _rtn_scale(orig, symmetric), _rtn_zero(orig, symmetric), args, dtype=torch.int8)
        changed, total = changed + int((rtn_codes != qt.codes).sum()), total + qt.codes.numel()
    assert 0.02 < changed / total < 0.6  # rounding decisions and ranges really moved
    rtn = _with_weights(model, lambda w: ref_rtn(w, 4, 64, symmetric))
    e_rtn, e_ar = _block_errors(rtn, fp_outs, tokens), _block_errors(q, fp_outs, tokens)
    assert all(a < 0.6 * r for a, r in zip(e_ar, e_rtn)), (e_ar, e_rtn)
    assert 0 < applied.notes["autoround_err_vs_rtn"] < 0.6


def _rtn_scale(w: torch.Tensor, symmetric: bool) -> torch.Tensor:
    v = w.unflatten(-1, (-1, 64)).unsqueeze(0)
    return calculate_qparams(v.amin(dim=(0, -1)), v.amax(dim=(0, -1)), _int_args(symmetric))[0]


def _rtn_zero(w: torch.Tensor, symmetric: bool) -> torch.Tensor:
    v = w.unflatten(-1, (-1, 64)).unsqueeze(0)
    return calculate_qparams(v.amin(dim=(0, -1)), v.amax(dim=(0, -1)), _int_args(symmetric))[1]


def test_tuned_nvfp4_lies_on_the_nvfp4_grid_and_beats_round_to_nearest(setup):
    model, tokens, fp_outs = setup
    q, _ = apply_recipe(copy.deepcopy(model), _autoround(PRESETS.get("nvfp4a16").weights, iters=30), tokens)
    args = preset_name_to_scheme("NVFP4A16", ["Linear"]).weights
    e2m1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    for name, mod in q.named_modules():
        if isinstance(mod, QuantLinear) and mod.qweight is not None:
            qt, w, orig = mod.qweight, mod.weight.data, model.get_submodule(name).weight.data
            assert torch.isin(qt.codes.abs(), e2m1).all(), name
            assert torch.equal(qt.global_scale, generate_gparam(orig.amin(), orig.amax()).reshape(1)), name  # kept
            assert torch.equal(qt.scale, qt.scale.to(torch.float8_e4m3fn).float()), name  # fp8 block scales
            assert torch.equal(ct.fake_quantize(w, qt.scale, qt.zero_point, args, global_scale=qt.global_scale), w)

    def ct_rtn(w: torch.Tensor) -> torch.Tensor:
        v, gs = w.unflatten(-1, (-1, 16)).unsqueeze(0), generate_gparam(w.amin(), w.amax()).reshape(1)
        s, z = calculate_qparams(v.amin(dim=(0, -1)), v.amax(dim=(0, -1)), args, global_scale=gs)
        return ct.fake_quantize(w, s, z, args, global_scale=gs)

    e_rtn = _block_errors(_with_weights(model, ct_rtn), fp_outs, tokens)
    e_ar = _block_errors(q, fp_outs, tokens)
    assert all(a < 0.8 * r for a, r in zip(e_ar, e_rtn)), (e_ar, e_rtn)


@pytest.mark.parametrize("preset", ["w8a8-fp8", "fp8-block", "mxfp8a16"])
def test_formats_without_a_learnable_quantizer_are_refused_when_the_config_is_read(preset):
    from quantbench.core.errors import ConfigError
    from quantbench.run.config import parse_config

    cfg = {"model": "default", "recipes": [{"preset": preset, "name": "r", "mitigations": [{"name": "autoround"}]}]}
    with pytest.raises(ConfigError, match="mitigation 'autoround': weights .* not supported"):
        parse_config(cfg)
