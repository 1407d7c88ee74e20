"""Real backends: our grid against optimum-quanto's quantizers (exact codes, documented differences
asserted exactly), run bitsandbytes/quanto where they can run (CPU here), measure stored weight
bytes, and skip cleanly with a reason where they cannot."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import tiny_model

from quantbench.quant.apply import apply_recipe
from quantbench.quant.backends import BackendUnavailable
from quantbench.quant.primitives import quantize_weight
from quantbench.quant.recipes import PRESETS
from quantbench.quant.spec import BACKENDS, QuantSpec

CPU = torch.device("cpu")
warnings.filterwarnings("ignore", message=".*kernels.*")


def _quanto():
    import optimum.quanto as oq  # a dependency: missing means a broken install, not a skip
    from optimum.quanto.tensor.optimizers import AbsmaxOptimizer, MaxOptimizer

    return oq, AbsmaxOptimizer(), MaxOptimizer()


def test_int8_per_channel_codes_equal_quanto_qint8_given_our_scale():
    """quanto's int8 quantizer (clamp(round(w / scale)) to [-128, 127]) is ours: fed our scales it
    returns our codes exactly. Documented difference: quanto's absmax scale (what its freeze stores,
    and what the quanto backend runs) is absmax / 127, ours (compressed-tensors) absmax / 127.5."""
    oq, absmax_opt, _ = _quanto()
    w = torch.randn(64, 256) * torch.linspace(0.1, 3, 64)[:, None]
    qt = quantize_weight(w, QuantSpec(bits=8, granularity="channel"))
    codes = torch.ops.quanto.quantize_symmetric(w, dtype=torch.int8, axis=0, scale=qt.scale)
    assert torch.equal(codes, qt.codes)
    scale = absmax_opt(w, oq.qint8, 0)  # [out, 1]
    absmax = w.abs().amax(1, keepdim=True)
    torch.testing.assert_close(scale * 127, absmax, rtol=1e-6, atol=0)
    torch.testing.assert_close(qt.scale * 127.5, absmax, rtol=1e-6, atol=0)
    lin = torch.nn.Sequential(torch.nn.Linear(256, 64, bias=False))
    lin[0].weight.data.copy_(w)
    oq.quantize(lin, weights=oq.qint8)
    oq.freeze(lin)
    assert torch.equal(lin[0].weight._scale, scale)  # the backend's weights use quanto's own scale


def test_int4_groupwise_asym_codes_equal_quanto_qint4_integer_zero_point():
    """quanto qint4 groups: the same scale (max - min) / 15 (every group spans 0 here, so
    compressed-tensors' widening of the range to 0 changes nothing); quanto's integer zero-point mode
    stores round(-min / scale) as an unsigned code, which is our signed zero point + 8, and its codes
    are ours + 8 ([0, 15] vs [-8, 7]). Documented difference: quanto's default shift is the float
    -min, so its grid holds each group's minimum exactly and not 0; ours holds 0 exactly."""
    oq, _, max_opt = _quanto()
    w = torch.randn(32, 256)
    w[:, ::16] = 0.0
    qt = quantize_weight(w, QuantSpec(bits=4, granularity="group", group_size=128, symmetric=False))
    scale, shift = max_opt(w, oq.qint4, 0, 128)  # [out * groups, 1] each
    torch.testing.assert_close(scale.reshape(32, 2), qt.scale, rtol=1e-6, atol=0)
    _, zshift = max_opt(w, oq.qint4, 0, 128, zeropoint=True)  # uint8 [out * groups, 1]
    assert torch.equal(zshift.reshape(32, 2).int(), qt.zero_point.int() + 8)
    data = torch.ops.quanto.quantize_affine(w, bits=4, axis=0, group_size=128, scale=qt.scale.reshape(-1, 1),
                                            shift=zshift)  # uint8 [out * groups, 128]
    assert torch.equal(data.reshape(32, 256).int(), qt.codes.int() + 8)
    lin = torch.nn.Sequential(torch.nn.Linear(256, 32, bias=False))
    lin[0].weight.data.copy_(w)
    oq.quantize(lin, weights=oq.qint4)
    lin[0].weight_group_size = 128
    oq.freeze(lin)
    theirs = lin[0].weight.dequantize().reshape(64, 128)  # [out * groups, 128]
    assert torch.equal(theirs.amin(-1), w.reshape(64, 128).amin(-1))  # float shift: the minimum is on the grid
    zeros = w.reshape(64, 128) == 0
    assert (qt.dequantize().reshape(64, 128)[zeros] == 0).all() and (theirs[zeros] != 0).all()


def test_backends_registered():
    assert {"simulated", "bnb-int8", "bnb-nf4", "bnb-fp4", "quanto"} <= set(BACKENDS.names())


# Stored bits per linear [out, in] (no bias in the tiny Llama), from each library's documented layout:
# bnb int8: int8 codes + one fp32 absmax per row (SCB); quanto qint8: int8 codes + one scale per row in
# the model dtype (fp32 here) + its two scalar activation-scale buffers (plain floats: 16 bits each).
EXPECTED_BITS = {
    "bnb-int8": lambda o, i: 8 * o * i + 32 * o,
    "bnb-int8-t6": lambda o, i: 8 * o * i + 32 * o,
    "quanto-w8": lambda o, i: 8 * o * i + 32 * o + 2 * 16,
    "quanto-w8a8": lambda o, i: 8 * o * i + 32 * o + 2 * 16,
}


@pytest.mark.parametrize("name", ["bnb-int8", "bnb-int8-t6", "bnb-nf4", "quanto-w8", "quanto-w8a8", "quanto-w4-g64"])
def test_real_backend_runs_or_skips_with_reason(tokens, name):
    m = tiny_model("llama", hidden=128)
    ref = m(input_ids=tokens).logits
    shapes = {n: tuple(mod.weight.shape) for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear)}
    try:
        q, applied = apply_recipe(copy.deepcopy(m), PRESETS[name], tokens, CPU)
    except BackendUnavailable as e:
        assert str(e)
        pytest.skip(f"{name}: {e}")
    with torch.no_grad():
        out = q(input_ids=tokens).logits
    assert torch.isfinite(out).all() and (out - ref).abs().max() < 0.5 * ref.abs().max()
    per = applied.size.per_linear
    assert set(per) == {n for n in shapes if not n.endswith("lm_head")}
    for n, bits in per.items():
        o, i = shapes[n]
        if name in EXPECTED_BITS:
            assert bits == EXPECTED_BITS[name](o, i), (n, bits)
        else:  # 4-bit codes plus per-block scales: between 4 and 6 bits per weight
            assert 4 * o * i < bits < 6 * o * i, (n, bits / (o * i))
    assert applied.size.bits_per_weight < 16


def test_unavailable_device_is_a_skip_not_a_crash(tokens):
    from quantbench.quant.apply import prepare
    from quantbench.quant.backends.bnb import BnbInt8
    from quantbench.quant.calibration import Calibration
    from quantbench.quant.plugin import QuantContext

    m = tiny_model("llama")
    plan = prepare(m, PRESETS["bnb-int8"])
    ctx = QuantContext(plan=plan, calib=Calibration(tokens, 4, torch.device("meta")))
    with pytest.raises(BackendUnavailable, match="meta"):
        BnbInt8().apply(m, plan, list(plan.linears), ctx, BnbInt8.Options())


def test_bnb_int8_stores_llm_int8_vectorwise_codes(tokens):
    """bitsandbytes int8 as the LLM.int8 paper writes it (row-wise absmax, 127 levels), written out here:
    codes = round(W · (127 / absmax_row)), SCB = absmax_row, computed by bitsandbytes on an fp16 copy of W
    (Int8Params casts to fp16 before quantizing); on CPU its matmul is x · (codes · SCB / 127)ᵀ with
    activations unquantized (the documented CPU behaviour)."""
    m = tiny_model("llama", hidden=128)
    w = m.model.layers[0].mlp.down_proj.weight.detach().clone()
    try:
        q, _ = apply_recipe(copy.deepcopy(m), PRESETS["bnb-int8"], tokens, CPU)
    except BackendUnavailable as e:
        pytest.skip(f"bnb-int8: {e}")
    mod = q.model.layers[0].mlp.down_proj
    sd = mod.state_dict()
    w16 = w.half().float()
    absmax = w16.abs().amax(dim=1)
    assert torch.equal(sd["weight"], torch.round(w16 * (127 / absmax[:, None])).to(torch.int8))
    assert torch.equal(sd["SCB"], absmax)
    x = torch.randn(5, w.shape[1])
    expected = x @ (sd["weight"].float() * absmax[:, None] / 127).T
    with torch.no_grad():
        assert torch.allclose(mod(x), expected, rtol=1e-4, atol=1e-5)


# --- only real unavailability may become a skip (BackendUnavailable); a bug must surface -----------------------


def _our_bug(*a, **k):
    raise AttributeError("'Linear' object has no attribute 'wieght'")  # a typo-class bug in our own code


def _bug_at_forward(old, new):  # our online-transform reattachment installs a broken hook: fails in the smoke test
    new.register_forward_pre_hook(lambda mod, args: _our_bug())


@pytest.mark.parametrize("target", ["as_linear", "reattach_online"])
def test_bnb_bug_in_our_code_propagates_not_skipped(tokens, monkeypatch, target):
    pytest.importorskip("bitsandbytes")
    import quantbench.quant.backends.bnb as qbnb

    monkeypatch.setattr(qbnb, target, _our_bug if target == "as_linear" else _bug_at_forward)
    with pytest.raises(AttributeError, match="wieght"):
        apply_recipe(tiny_model("llama", hidden=128), PRESETS["bnb-nf4"], tokens, CPU)


def test_bnb_argument_error_raised_inside_bitsandbytes_propagates(tokens, monkeypatch):
    """bitsandbytes' own argument check ("invalid blocksize") is our bad call, not a missing kernel."""
    pytest.importorskip("bitsandbytes")
    from quantbench.quant.backends.bnb import BnbNF4

    def bad_layer(self, bnb, lin, lp, opts, device):
        bnb.functional.quantize_4bit(lin.weight.data, blocksize=3, quant_type="nf4")

    monkeypatch.setattr(BnbNF4, "_layer", bad_layer)
    with pytest.raises(ValueError, match="invalid blocksize 3"):
        apply_recipe(tiny_model("llama", hidden=128), PRESETS["bnb-nf4"], tokens, CPU)


def _missing_kernel_real(bnb):  # bitsandbytes' own path for a native function this build lacks
    bnb.functional.elementwise_func("no_such_kernel", torch.zeros(4), None, 0.0)


def _missing_kernel_simulated(bnb):  # a "no kernel" NotImplementedError whose raising frame is bitsandbytes' file
    code = compile("raise NotImplementedError('no kernel image is available for execution on the device')",
                   bnb.functional.__file__, "exec")
    exec(code, {})


@pytest.mark.parametrize("raiser", [_missing_kernel_real, _missing_kernel_simulated])
def test_bnb_missing_kernel_inside_bitsandbytes_is_unavailable(tokens, monkeypatch, raiser):
    pytest.importorskip("bitsandbytes")
    from quantbench.quant.backends.bnb import BnbNF4

    monkeypatch.setattr(BnbNF4, "_layer", lambda self, bnb, *a: raiser(bnb))
    with pytest.raises(BackendUnavailable, match=r"^bitsandbytes bnb-nf4 cannot run on cpu: \S"):
        apply_recipe(tiny_model("llama", hidden=128), PRESETS["bnb-nf4"], tokens, CPU)
