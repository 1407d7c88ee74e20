"""Quantization primitives, QuantLinear and recipe data: round-trip error, granularity shapes,
static vs dynamic ranges, asymmetric zero points, KV quantization, presets round-trip YAML."""
from __future__ import annotations

import pytest
import torch
import yaml
from conftest import tiny_model

from quantbench.core.errors import QuantbenchError
from quantbench.quant.apply import apply_recipe, prepare
from quantbench.quant.mitigations.int8_decomp import KeepChannels
from quantbench.quant.mitigations.outlier_tokens import KeepTokens, TokenState
from quantbench.quant.plan import LinearPlan
from quantbench.quant.primitives import FP8_MAX, block_range, blocks, fake_quant, qparams_from_range
from quantbench.quant.qlinear import QuantLinear
from quantbench.quant.recipes import PRESETS, resolve_recipe
from quantbench.quant.spec import QuantSpec, Recipe

CPU = torch.device("cpu")


def _ql(lin, w, a, keep=None) -> QuantLinear:
    return QuantLinear(lin, LinearPlan("l", w, a, None, "simulated"), keep=keep)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("gran", ["tensor", "channel", "group"])
def test_round_trip_is_the_nearest_point_of_the_documented_grid(bits, symmetric, gran):
    """The grid of docs/quantization.md written out here in float64 (not taken from the code):
    range widened to 0; symmetric step = absmax / ((2^b - 1) / 2), points k * step; asymmetric
    step = (max - min) / (2^b - 1), points (k - zp) * step, zp = round(qmin - min / step); k in
    [-2^(b-1), 2^(b-1) - 1]. Fake-quant returns a point of that grid within half a step of x."""
    x = torch.randn(16, 128) * torch.linspace(0.1, 5, 128)
    spec = QuantSpec(bits=bits, symmetric=symmetric, granularity=gran, group_size=32 if gran == "group" else None)
    shape = {"tensor": (1, 1, -1), "channel": (16, 1, 128), "group": (16, 4, 32)}[gran]
    xb = x.double().reshape(shape)  # [R, G, B]
    lo, hi = xb.amin(-1, keepdim=True).clamp(max=0), xb.amax(-1, keepdim=True).clamp(min=0)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if symmetric:
        step, zp = torch.maximum(-lo, hi) / ((2**bits - 1) / 2), torch.zeros_like(lo)
    else:
        step = (hi - lo) / (2**bits - 1)
        zp = torch.round(qmin - lo / step)
    y = fake_quant(x, spec).double().reshape(xb.shape)
    k = y / step + zp
    assert (k - k.round()).abs().max() < 1e-3  # on the grid
    assert k.round().min() >= qmin and k.round().max() <= qmax
    assert ((y - xb).abs() <= step / 2 * (1 + 1e-4)).all()  # the nearest point


def test_block_shapes():
    x = torch.randn(6, 128)
    assert blocks(x, "tensor").shape == (1, 1, 768)
    assert blocks(x, "channel").shape == (6, 1, 128)
    assert blocks(torch.randn(2, 3, 128), "token").shape == (6, 1, 128)
    assert blocks(x, "group", 32).shape == (6, 4, 32)
    with pytest.raises(ValueError):
        blocks(x, "group", 48)


def test_asymmetric_zero_point_represents_zero_and_shifted_ranges():
    x = torch.rand(4, 64) * 3 + 1.0  # all positive: asym uses the full grid on [0, max]
    spec = QuantSpec(bits=4, symmetric=False, granularity="channel")
    xb = blocks(x, "channel")
    scale, zero = qparams_from_range(*block_range(xb, spec), spec)
    assert zero.dtype == torch.int8 and (zero == -8).all()  # signed codes [-8, 7]: min 0 sits at qmin
    assert fake_quant(torch.zeros(4, 64), spec).abs().max() == 0
    sym = QuantSpec(bits=4, symmetric=True, granularity="channel")
    assert (fake_quant(x, spec) - x).pow(2).mean() < (fake_quant(x, sym) - x).pow(2).mean()


def test_fp8_is_e4m3():
    spec = QuantSpec(bits=8, format="fp8", granularity="tensor")
    x = torch.randn(64, 64)
    y = fake_quant(x, spec)
    scale = x.abs().max() / FP8_MAX
    assert torch.equal(y, ((x / scale).to(torch.float8_e4m3fn).float() * scale))
    assert (y - x).abs().max() / x.abs().max() < 2 ** -3


def test_static_ranges_come_from_calibration_and_dynamic_from_each_call():
    lin = torch.nn.Linear(32, 8)
    static = _ql(lin, None, QuantSpec(bits=8, granularity="tensor", dynamic=False))
    dynamic = _ql(lin, None, QuantSpec(bits=8, granularity="tensor", dynamic=True))
    static.calibrating = True
    static(torch.randn(4, 32) * 100)  # wide calibration range
    static.freeze()
    x = torch.randn(4, 32)
    err_s = (static.quant_input(x) - x).abs().max()
    err_d = (dynamic.quant_input(x) - x).abs().max()
    assert err_s > 5 * err_d  # the static step was set by the calibration data
    with pytest.raises(RuntimeError):
        _ql(lin, None, QuantSpec(bits=8, granularity="tensor", dynamic=False)).freeze()


def test_token_keep_and_kept_channels_stay_exact_and_leave_ranges():
    lin = torch.nn.Linear(32, 8)
    a4 = QuantSpec(bits=4, granularity="tensor", dynamic=True)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[:, 0] = True
    q = _ql(lin, None, a4, keep=[KeepTokens(TokenState(mask=mask))])
    x = torch.randn(2, 5, 32)
    x[:, 0, 3] = 1000.0
    xq = q.quant_input(x)
    assert torch.equal(xq[:, 0], x[:, 0])
    assert (xq[:, 1:] - x[:, 1:]).abs().max() < 0.5  # range set by the ordinary tokens only
    q = _ql(lin, None, a4, keep=[KeepChannels(threshold=50.0)])
    xq = q.quant_input(x)
    assert torch.equal(xq[..., 3], x[..., 3]) and (xq - x).abs().max() < 0.5


def test_presets_round_trip_yaml_and_preset_overrides():
    for r in PRESETS.values():
        assert Recipe.model_validate(yaml.safe_load(yaml.safe_dump(r.model_dump(mode="json")))) == r
    r = resolve_recipe({"preset": "w8a8-tensor-static-sq", "name": "sq9",
                        "mitigations": [{"name": "smoothquant", "options": {"alpha": 0.9}}]})
    assert r.mitigations[0].options["alpha"] == 0.9 and r.activations.dynamic is False


def test_kv_quantization_changes_only_k_and_v_outputs(tokens):
    m = tiny_model("llama")
    ref = m(input_ids=tokens).logits
    r = Recipe(name="kv4", kv=QuantSpec(bits=4, granularity="group", group_size=16))  # head_dim 16
    prepare(m, r)
    q, _ = apply_recipe(m, r, tokens, CPU)
    ks = [mod for n, mod in q.named_modules() if isinstance(mod, QuantLinear)]
    assert len(ks) == 4 and all(k.ospec is not None and k.name.endswith(("k_proj", "v_proj")) for k in ks)
    out = q(input_ids=tokens).logits
    assert 0 < (out - ref).abs().max() < 0.5 * ref.abs().max()


def test_kv_rejected_clearly_where_it_cannot_work():
    with pytest.raises(QuantbenchError, match="fuses q/k/v"):
        prepare(tiny_model("gpt2"), Recipe(name="kv", kv=QuantSpec(bits=8, granularity="token")))
    with pytest.raises(QuantbenchError, match="head dimension"):
        prepare(tiny_model("llama"), Recipe(name="kv", kv=QuantSpec(bits=8, granularity="group", group_size=24)))
    with pytest.raises(ValueError):
        Recipe(name="kv", kv=QuantSpec(bits=8, granularity="tensor", dynamic=False))


def test_kv_per_tensor_is_refused_because_its_range_would_see_future_tokens():
    """A dynamic per-tensor range over a k/v output [B, T, D] spans every position: token 0's cached key
    would depend on token 3's value (shown on the primitive), which no KV cache can do; the recipe is refused."""
    spec = QuantSpec(bits=4, granularity="tensor", dynamic=True)
    y = torch.tensor([[[0.3, -0.2], [0.1, 0.4], [0.2, 0.1], [0.05, 0.1]]])  # [1, T=4, D=2]
    later = y.clone()
    later[0, 3] = torch.tensor([8.0, -8.0])  # only a future token changes
    assert not torch.equal(fake_quant(y, spec)[0, 0], fake_quant(later, spec)[0, 0])
    with pytest.raises(ValueError, match="future tokens included"):
        Recipe(name="kv", kv=spec)
    with pytest.raises(ValueError, match="future tokens included"):
        Recipe(name="kv", overrides=[{"match": "k_proj", "kv": {"bits": 8, "granularity": "tensor"}}])
