"""Real backends: cross-check our RTN against optimum-quanto, run bitsandbytes/quanto where they
can run (CPU here), measure stored weight bytes, and skip cleanly with a reason where they cannot."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

from quantbench.quant.apply import apply_recipe
from quantbench.quant.backends import BackendUnavailable
from quantbench.quant.spec import BACKENDS
from quantbench.quant.primitives import fake_quant
from quantbench.quant.recipes import PRESETS
from quantbench.quant.spec import QuantSpec

from conftest import tiny_model

CPU = torch.device("cpu")
warnings.filterwarnings("ignore", message=".*kernels.*")


def _quanto_dequant(w: torch.Tensor, qtype_name: str, group: int | None = None) -> torch.Tensor:
    oq = pytest.importorskip("optimum.quanto")
    lin = torch.nn.Sequential(torch.nn.Linear(w.shape[1], w.shape[0], bias=False))
    lin[0].weight.data.copy_(w)
    oq.quantize(lin, weights=getattr(oq, qtype_name))
    if group is not None:
        lin[0].weight_group_size = group
    oq.freeze(lin)
    return lin[0].weight.dequantize().float()


def test_int8_per_channel_matches_quanto():
    w = torch.randn(64, 256) * torch.linspace(0.1, 3, 64)[:, None]
    ours = fake_quant(w, QuantSpec(bits=8, granularity="channel"))
    step = w.abs().amax(1, keepdim=True) / 127  # [out, 1]
    diff = (ours - _quanto_dequant(w, "qint8")).abs()
    assert (diff <= step * 1.001).all()
    assert (diff < 1e-6).float().mean() > 0.99  # same grid: identical except float ties


def test_int4_groupwise_asym_matches_quanto_within_one_step():
    """quanto qint4 is affine (scale + shift) per group; ours is asymmetric with an integer zero point.
    Deliberate difference: our zero point is rounded to an integer (zero exactly representable),
    quanto's shift is a float, so values may differ by at most one step."""
    w = torch.randn(32, 256)
    spec = QuantSpec(bits=4, granularity="group", group_size=128, symmetric=False)
    ours = fake_quant(w, spec)
    wb = w.reshape(32, 2, 128)
    step = ((wb.amax(-1, keepdim=True) - wb.amin(-1, keepdim=True)) / 15).expand_as(wb).reshape(32, 256)
    diff = (ours - _quanto_dequant(w, "qint4", 128)).abs()
    assert (diff <= step * 1.001).all()
    assert diff.mean() < 0.5 * step.mean()  # grids offset by a fraction of a step, not a different scale


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
