"""GPTQ, clipping and SmoothQuant on the float formats (issue 23 §2): NVFP4, MXFP4, MXFP8, fp8 per channel and
fp8 128x128 blocks.

(a) GPTQ's weights lie on the format's grid: compressed-tensors' own quantize / dequantize / fake_quantize at the
    scales GPTQ stored (and NVFP4's global scale) give back the same weights and codes bit for bit, the scales are
    ones the format can store (e4m3 values; e8m0 powers of two through the library's compress_mx_scale), and the
    NVFP4 global scale is the library's generate_gparam of the weights GPTQ started from.
(b) On a layer with correlated inputs GPTQ's output error ||X W^T - X Q^T|| is well below round-to-nearest's on
    the same format (round-to-nearest being quantize_weight, bit-exact with compressed-tensors in
    tests/test_fp_formats.py).
(c) A GPTQ'd NVFP4 / MXFP4 recipe exports and verifies, and compressed-tensors' own compressor, given the GPTQ
    weights and our scales, writes exactly the tensors we wrote.
Then: clipping on NVFP4 (the search's grid is the one the backend rounds to), and the new presets on a tiny
Llama with planted outlier channels.
"""
from __future__ import annotations

import copy
import json

import compressed_tensors.quantization.lifecycle.forward as ct
import pytest
import torch
from compressed_tensors.compressors.mx_utils import compress_mx_scale
from compressed_tensors.quantization.utils import generate_gparam
from conftest import tiny_model
from test_fp_formats import PAIRS, _ct, _equal_codes, _weight

from quantbench.quant.mitigations.clip import block_errors, clamp_blocks, search_clip
from quantbench.quant.mitigations.gptq import gptq_quantize
from quantbench.quant.primitives import FP8_DTYPE, fake_quant, quantize_weight
from quantbench.quant.recipes import PRESETS

CPU = torch.device("cpu")
FORMATS = ("nvfp4a16", "mxfp4a16", "mxfp8a16", "fp8-block", "fp8-dynamic")
OPTIONS = {"default": {}, "mse": {"mse": True}, "static": {"static_groups": True}, "act_order": {"act_order": True},
           "block100": {"block": 100}}  # block 100: groups of 16 / 32 straddle the lazy blocks


def _inputs(n_in: int, n: int = 2048, seed: int = 0) -> torch.Tensor:
    """Correlated layer inputs [n, n_in]: a rank-16 common part, noise, and a few heavy channels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g) @ torch.randn(16, n_in, generator=g) + torch.randn(n, n_in, generator=g)
    x[:, :3] *= 8.0
    return x


def _spec(preset: str):
    return PRESETS.get(preset).weights


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("preset", FORMATS)
def test_gptq_weights_are_on_the_compressed_tensors_grid(preset, option):
    """(a) for random and outlier-heavy weights (1000x entries, an all-zero row and group, a constant group,
    subnormal-scale groups, e2m1 ties), 200 x 320 for the 128 x 128 blocks (padded tiles)."""
    args, spec = _ct(PAIRS[preset]), _spec(preset)
    shape = (200, 320) if preset == "fp8-block" else (48, 256)
    x = _inputs(shape[1])
    h = x.double().T @ x.double()
    for kind in ("random", "outliers"):
        w, what = _weight(kind, torch.float32, shape), f"{preset} {option} {kind}"
        qt = gptq_quantize(w, h, spec, **OPTIONS[option])
        wq, gs = qt.dequantize(), qt.global_scale
        codes = ct.quantize(wq, qt.scale, qt.zero_point, args, dtype=FP8_DTYPE if args.num_bits == 8 else None,
                            global_scale=gs)
        _equal_codes(qt.codes, codes, what)
        assert torch.equal(ct.dequantize(codes, qt.scale, qt.zero_point, args, global_scale=gs), wq), what
        assert torch.equal(ct.fake_quantize(wq, qt.scale, qt.zero_point, args, global_scale=gs), wq), what
        assert not torch.equal(wq, quantize_weight(w, spec).dequantize()), what  # not round-to-nearest
        if spec.format == "nvfp4":  # scales on the e4m3 grid under the library's global scale of the given weights
            assert torch.equal(gs, generate_gparam(w.amin().reshape(1), w.amax().reshape(1))), what
            assert torch.equal(qt.scale.to(FP8_DTYPE).float(), qt.scale), what
        elif spec.micro:  # e8m0: the library's stored exponent gives the scale back
            e = compress_mx_scale(qt.scale, torch.uint8)
            assert torch.equal(2.0 ** (e.float() - 127), qt.scale), what
            assert gs is None
        else:
            assert gs is None and qt.scale.shape == ((2, 3) if preset == "fp8-block" else (48, 1)), what


@pytest.mark.parametrize("preset", FORMATS)
def test_gptq_output_error_is_below_round_to_nearest(preset):
    """(b) ||X W^T - X Q^T||_F on held-out inputs of the same distribution, GPTQ vs round-to-nearest on the same
    format; and the mse scale search and static groups stay well below round-to-nearest too."""
    spec = _spec(preset)
    shape = (256, 256) if preset == "fp8-block" else (96, 512)
    g = torch.Generator().manual_seed(3)
    w = torch.randn(*shape, generator=g) * 0.05
    x = _inputs(shape[1], n=2048 + 512, seed=1)
    x, held = x[:2048], x[2048:]
    h = x.double().T @ x.double()
    err = lambda q: float((held @ (q.dequantize() - w).T).norm())  # noqa: E731
    rtn = err(quantize_weight(w, spec))
    for opts in ({}, {"mse": True}, {"static_groups": True}):
        gptq = err(gptq_quantize(w, h, spec, **opts))
        assert gptq < 0.7 * rtn, (preset, opts, gptq, rtn)


def test_groups_are_fitted_on_the_updated_weights():
    """A float-format group's scale is fitted from the weights as the error feedback left them when its first
    column is reached: with lazy blocks of 100 (groups straddling them) and of 1 (every update applied at once)
    the result is the same grid up to float rounding of the updates, and both differ from fitting up front."""
    spec = _spec("nvfp4a16")
    x = _inputs(256)
    h = x.double().T @ x.double()
    w = _weight("random", torch.float32, (48, 256))
    a, b = gptq_quantize(w, h, spec, block=100), gptq_quantize(w, h, spec, block=1)
    static = gptq_quantize(w, h, spec, static_groups=True)
    same = (a.scale == b.scale).float().mean()
    assert same > 0.99, same
    assert (a.scale != static.scale).any()


def test_clip_on_nvfp4_searches_the_grid_the_backend_rounds_to():
    """The clamped weight keeps its global scale (the blocks holding its absmax are not clipped), so the error the
    search recorded for each block is the error of the backend's round-to-nearest of the clamped weight. The
    tensor's absmax sits in a block that clipping would otherwise pay for (moderate weights beside it, the
    outlier on an input that is nearly always 0): unpinned, that block would be clipped and the global scale move."""
    spec = _spec("nvfp4a16")
    g = torch.Generator().manual_seed(4)
    w = torch.randn(64, 256, generator=g) * 0.05
    w[torch.arange(64), torch.randint(0, 256, (64,), generator=g)] *= 12  # one outlier per row: clipping pays
    w[5, 32:48] = torch.randn(16, generator=g) * 0.3
    w[5, 40] = 3.0  # the tensor's absmax, in block (5, 2)
    x = _inputs(256)[:512]
    x[:, 40] *= 1e-3
    r, e, e0 = search_clip(w, x, spec, (1.0, 0.9, 0.8, 0.7, 0.6))
    clamped = clamp_blocks(w, spec, r)
    assert (r < 1).any() and float(e.sum()) < float(e0.sum())
    assert r[5, 2] == 1.0 and (r == 1).float().mean() < 1
    rtn = quantize_weight(clamped, spec)  # the simulated backend's stored weight
    assert torch.equal(rtn.global_scale, generate_gparam(w.amin().reshape(1), w.amax().reshape(1)))
    assert torch.equal(rtn.dequantize(), fake_quant(clamped, spec))
    assert torch.allclose(block_errors(x, rtn.dequantize() - w, spec), e, rtol=1e-5, atol=0)
    unpinned = torch.full_like(r, 1.0)
    unpinned[5, 2] = 0.6  # what the search would pick there without the pin: a smaller global scale
    assert not torch.equal(quantize_weight(clamp_blocks(w, spec, unpinned), spec).global_scale, rtn.global_scale)


def _outlier_model():
    m = tiny_model("llama", hidden=128)
    with torch.no_grad():
        for layer in m.model.layers:
            layer.input_layernorm.weight[7] = 50.0
            layer.post_attention_layernorm.weight[19] = 50.0
    return m


@pytest.mark.parametrize("name, naive", [("nvfp4a16-gptq", "nvfp4a16"), ("mxfp4a16-gptq", "mxfp4a16"),
                                         ("nvfp4-gptq", "nvfp4"), ("nvfp4-sq", "nvfp4"),
                                         ("nvfp4-rot-gptq", "nvfp4"), ("mxfp4-rot-gptq", "mxfp4")])
def test_float_presets_with_mitigations_beat_round_to_nearest(name, naive):
    """The new presets through apply_recipe (calibrated on one set of tokens, scored on another): mean squared
    logit error vs FP clearly below the plain format's."""
    from quantbench.quant.apply import apply_recipe

    m = _outlier_model()
    calib = torch.randint(3, 128, (8, 64), generator=torch.Generator().manual_seed(0))
    held = torch.randint(3, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = m(input_ids=held).logits
    err = {}
    for r in (name, naive):
        q, _ = apply_recipe(copy.deepcopy(m), PRESETS[r], calib, CPU)
        with torch.no_grad():
            err[r] = (q(input_ids=held).logits - ref).pow(2).mean().item()
    assert err[name] < 0.7 * err[naive], err


# ---- (c) export ------------------------------------------------------------------------------------------------

EXPORTED = {"nvfp4a16-gptq": "NVFP4A16", "mxfp4a16-gptq": "MXFP4A16", "nvfp4-gptq": "NVFP4"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from test_export import tiny_sweep

    from quantbench.export.context import load_run_context

    base = tmp_path_factory.mktemp("export_fp_gptq")
    return load_run_context(tiny_sweep(base, list(EXPORTED), hidden=128, intermediate=256)), base


@pytest.mark.parametrize("name", list(EXPORTED))
def test_gptq_float_recipes_export_and_verify(run, name, monkeypatch):
    """(c) export_verified (by the reload for MXFP4A16, by the stored tensors where transformers cannot run the
    format in float32), and compressed-tensors' compressor of the preset, given the GPTQ'd weights, our scales and
    NVFP4's global scale, writes every tensor we wrote bit for bit."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES
    from safetensors.torch import load_file

    from quantbench.export import job
    from quantbench.export.job import export_recipe
    from quantbench.quant.qlinear import QuantLinear

    kept, real = {}, job._build
    monkeypatch.setattr(job, "_build", lambda *a: kept.setdefault(a[1].name, real(*a)))
    rc, base = run
    cols = export_recipe(rc, name, base / "out" / name)
    sim = kept[name][0]
    assert cols["export_verified"] is True, cols.get("export_weights_mismatch")
    if name == "mxfp4a16-gptq":  # transformers runs it densely: the same logits as the simulated model
        assert cols["export_verified_by"] == "reload" and cols["export_logit_maxdiff"] == 0.0
    else:
        assert cols["export_verified_by"].startswith("stored tensors")
    rows = [json.loads(line) for line in open(rc.run_dir / "rows.jsonl")]
    row = next(r for r in rows if r.get("recipe") == name)
    assert row["status"] == "ok" and row.get("gptq_layers") == 14
    scheme = QuantizationScheme(targets=["Linear"], **PRESET_SCHEMES[EXPORTED[name]])
    compressor = BaseCompressor.get_value_from_registry(infer_module_format(torch.nn.Linear, scheme).value)
    stored = load_file(f"{cols['export_path']}/model.safetensors")
    qlinears = {n: q for n, q in sim.named_modules() if isinstance(q, QuantLinear) and q.qweight is not None}
    assert len(qlinears) == 14
    for mod, q in qlinears.items():
        assert not torch.equal(q.weight, quantize_weight(rc.lm.model.get_submodule(mod).weight.detach(),
                                                         q.plan.weights).dequantize()), mod  # GPTQ, not RTN
        given = {"weight": q.weight.detach(), "weight_scale": q.qweight.scale}
        if q.qweight.global_scale is not None:
            given["weight_global_scale"] = q.qweight.global_scale
        lib = compressor.compress(given, scheme)
        ours = {k.removeprefix(mod + "."): v for k, v in stored.items() if k.startswith(mod + ".")}
        for key, value in lib.items():
            assert value.dtype == ours[key].dtype and torch.equal(value, ours[key]), (name, mod, key)
