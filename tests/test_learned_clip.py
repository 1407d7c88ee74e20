"""learned_clip (OmniQuant's learnable weight clipping) against independent references: the grid is
written out here from compressed-tensors' formulas (not imported), RTN and clip's grid search are the
baselines it must beat, and a brute-force scan of the clip factor bounds what any learner can reach."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_model

from quantbench.quant.apply import apply_recipe
from quantbench.quant.mitigations.clip import clamp_blocks, search_clip
from quantbench.quant.mitigations.learned_clip import clamp_to, learn_clip, lwc_fake_quant
from quantbench.quant.primitives import fake_quant
from quantbench.quant.spec import MitigationSpec, QuantSpec, Recipe

GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)  # clip's default ratios


def ref_rtn(w: torch.Tensor, bits: int, group: int, symmetric: bool) -> torch.Tensor:
    """Round-to-nearest per group of `group` inputs, compressed-tensors' int grid written out:
    signed codes [-2^(b-1), 2^(b-1)-1]; sym scale max|w| / ((qmax-qmin)/2), asym (hi-lo)/(qmax-qmin)
    with an integer zero point; 0 always in the range; round half to even."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    wb = w.reshape(w.shape[0], -1, group)
    lo, hi = wb.amin(-1, keepdim=True).clamp_max(0), wb.amax(-1, keepdim=True).clamp_min(0)
    if symmetric:
        s, z = torch.maximum(-lo, hi) / torch.tensor((qmax - qmin) / 2), torch.zeros_like(lo)
    else:
        s = (hi - lo) / torch.tensor(float(qmax - qmin))
        z = torch.round(torch.clamp(qmin - lo / s, qmin, qmax))
    q = torch.round(torch.clamp(wb / s + z, qmin, qmax))
    return ((q - z) * s).reshape(w.shape)


def planted(seed: int = 1, out: int = 64, d: int = 128, g: int = 32):
    """Gaussian weights with one outlier (12 sigma) per group, correlated gaussian inputs."""
    torch.manual_seed(seed)
    w = torch.randn(out, d)
    for gi in range(d // g):
        w[torch.arange(out), gi * g + torch.randint(0, g, (out,))] = 12.0 * torch.sign(torch.randn(out))
    x = torch.randn(512, d) @ (torch.eye(d) + 0.3 * torch.randn(d, d) / d ** 0.5)
    return w, x


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("gran", ["group", "channel"])
def test_learned_quantizer_is_the_backends_rtn_of_the_clamped_weights(symmetric, gran):
    torch.manual_seed(0)
    spec = QuantSpec(bits=4, granularity=gran, group_size=32 if gran == "group" else None, symmetric=symmetric)
    w = torch.randn(16, 128)
    shape = (16, 4 if gran == "group" else 1)
    g, b = torch.rand(shape) * 0.6 + 0.4, torch.rand(shape) * 0.6 + 0.4
    wc = clamp_to(w, spec, g, None if symmetric else b)
    learned = lwc_fake_quant(w, spec, g, None if symmetric else b)
    assert torch.equal(learned, fake_quant(wc, spec))  # what the simulated backend will compute
    assert torch.equal(learned, ref_rtn(wc, 4, 32 if gran == "group" else 128, symmetric))
    # the range really is clipped: the largest magnitude per block shrinks by the learned factor
    if symmetric:
        am = w.abs().reshape(16, shape[1], -1).amax(-1)
        assert torch.allclose(wc.abs().reshape(16, shape[1], -1).amax(-1), am * g)


@pytest.mark.parametrize("symmetric", [True, False])
def test_learned_factors_beat_rtn_and_the_grid_search_on_planted_outliers(symmetric):
    w, x = planted()
    spec = QuantSpec(bits=4, granularity="group", group_size=32, symmetric=symmetric)

    def err(wq: torch.Tensor) -> float:  # the linear's output error on X
        return float((x @ (wq - w).T).pow(2).sum())

    e_rtn = err(ref_rtn(w, 4, 32, symmetric))
    r = search_clip(w, x, spec, GRID)[0]
    e_grid = err(ref_rtn(clamp_blocks(w, spec, r), 4, 32, symmetric))
    g, b, _, _ = learn_clip(w, x, spec, steps=100, init=r)  # from the grid's ratios
    e_learned = err(ref_rtn(clamp_to(w, spec, g, b), 4, 32, symmetric))
    g4, b4, _, _ = learn_clip(w, x, spec, steps=300, init=4.0)  # OmniQuant's initialisation
    e_omni = err(ref_rtn(clamp_to(w, spec, g4, b4), 4, 32, symmetric))
    assert e_grid < e_rtn
    assert e_learned < e_grid
    assert e_omni < 0.98 * e_rtn
    assert bool(((g > 0) & (g < 1)).all())


def test_learned_factor_is_bounded_by_a_brute_force_scan():
    """One block per output channel, symmetric: the loss of one channel depends on its factor alone,
    so a dense scan of the factor (reference quantizer) is the global optimum per channel."""
    w, x = planted(seed=3, out=8, d=64, g=64)
    spec = QuantSpec(bits=4, granularity="channel", symmetric=True)
    hx = x.T @ x

    def row_err(wq: torch.Tensor) -> torch.Tensor:  # [out]
        d = wq - w
        return torch.einsum("oi,ij,oj->o", d, hx, d)

    scan = torch.linspace(0.3, 1.0, 2801)
    best = torch.full((8,), float("inf"))
    for a in scan:
        best = torch.minimum(best, row_err(ref_rtn(clamp_to(w, spec, torch.full((8, 1), float(a)), None), 4, 64, True)))
    r = search_clip(w, x, spec, GRID)[0]
    e_grid = row_err(ref_rtn(clamp_blocks(w, spec, r), 4, 64, True))
    g, _, _, _ = learn_clip(w, x, spec, steps=200, init=r)
    e_learned = row_err(ref_rtn(clamp_to(w, spec, g, None), 4, 64, True))
    assert bool((e_learned >= best * (1 - 1e-4)).all())  # nothing beats the global optimum
    assert float(e_learned.sum()) <= float(e_grid.sum())
    assert float(e_learned.sum()) <= 1.05 * float(best.sum())  # and the learner gets close to it


def test_learned_clip_in_a_recipe(tokens):
    m = tiny_model("llama")
    w4 = QuantSpec(bits=4, granularity="group", group_size=32)
    rtn = Recipe(name="rtn", weights=w4)
    lwc = rtn.model_copy(update={"name": "lwc", "mitigations": (
        MitigationSpec(name="learned_clip", options={"steps": 20, "search_tokens": 64, "calib_samples": 2}),)})
    with torch.no_grad():
        ref = m(input_ids=tokens).logits
    qr, _ = apply_recipe(copy.deepcopy(m), rtn, tokens)
    ql, applied = apply_recipe(copy.deepcopy(m), lwc, tokens)
    assert 0 < applied.notes["learned_clip_err_vs_rtn"] <= 1.0
    assert applied.notes["learned_clip_s"] >= 0
    with torch.no_grad():
        err = [float((q(input_ids=tokens).logits - ref).pow(2).mean()) for q in (qr, ql)]
    assert err[1] < err[0]
