"""GPTQ's `mse` scale search against a transcription of the reference Quantizer's `mse=True` loop
(IST-DASLab gptq quant.py find_params: maxshrink 0.8, grid 100, norm 2.4), on our symmetric grid
(compressed-tensors: scale = absmax / ((qmax - qmin) / 2), codes [-8, 7] at 4 bits) written out here."""
from __future__ import annotations

import torch

from quantbench.quant.mitigations.gptq import _fit, gptq_quantize
from quantbench.quant.spec import QuantSpec


def reference_mse_scale(x: torch.Tensor) -> torch.Tensor:
    """Per row of x [R, B]: the reference loop, symmetric 4-bit."""
    absmax = x.abs().amax(1)
    best = torch.full([x.shape[0]], float("inf"))
    scale = absmax / 7.5
    for i in range(int(0.8 * 100)):
        p = 1 - i / 100
        scale1 = p * absmax / 7.5
        q = torch.round(torch.clamp(x / scale1[:, None], -8, 7)) * scale1[:, None]
        err = (q - x).abs().pow(2.4).sum(1)
        tmp = err < best
        best[tmp] = err[tmp]
        scale = torch.where(tmp, scale1, scale)
    return scale


def test_mse_fit_is_the_reference_search():
    torch.manual_seed(0)
    w = torch.randn(32, 64)
    w[torch.arange(32), torch.randint(0, 64, (32,))] *= 8  # one outlier per row: shrinking pays
    s, z = _fit(w, QuantSpec(bits=4, granularity="channel"), mse=True)
    ref = reference_mse_scale(w)
    assert torch.allclose(s[:, 0], ref, rtol=1e-6)
    assert (ref < w.abs().amax(1) / 7.5).float().mean() > 0.5  # most rows really shrink
    assert torch.equal(z, torch.zeros_like(z))


def test_gptq_with_mse_scales_on_planted_outliers():
    torch.manual_seed(1)
    w = torch.randn(64, 128)
    w[torch.arange(64), torch.randint(0, 128, (64,))] = 12.0
    x = torch.randn(1024, 128)
    h = x.T @ x
    spec = QuantSpec(bits=4, granularity="group", group_size=32)
    err = {m: float((x @ (gptq_quantize(w, h, spec, mse=m).dequantize() - w).T).pow(2).sum()) for m in (False, True)}
    assert err[True] < err[False]
