"""Pure tensor primitives: qparams, quantize, dequantize, fake-quant.

One block notion serves every granularity: a tensor x[..., D] is viewed as blocks[R, G, B]
and one (scale, zero) is shared by the B elements of each block:
  tensor  -> [1, 1, numel]         channel/token -> [rows, 1, D]      group g -> [rows, D/g, g]
(for a weight [out, in], "channel" means one scale per output row, i.e. per output channel).
"""
from __future__ import annotations

import torch

from .spec import QuantSpec

FP8_MAX = 448.0  # largest finite float8_e4m3fn
_EPS = 1e-8


def blocks(x: torch.Tensor, granularity: str, group_size: int | None = None) -> torch.Tensor:
    """View x[..., D] as [R, G, B] blocks sharing one scale each (see module doc)."""
    d = x.shape[-1]
    if granularity == "tensor":
        return x.reshape(1, 1, -1)
    if granularity in ("channel", "token"):
        return x.reshape(-1, 1, d)
    if granularity == "group":
        if group_size is None or d % group_size:
            raise ValueError(f"group_size {group_size} does not divide the last dimension {d}")
        return x.reshape(-1, d // group_size, group_size)
    raise ValueError(f"unknown granularity {granularity!r}")


def int_range(bits: int, symmetric: bool) -> tuple[int, int]:
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)


def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) from per-block min/max (already clipped). Symmetric: zero = 0."""
    if spec.format == "fp8":
        return torch.maximum(-lo, hi).clamp_min(_EPS) / FP8_MAX, torch.zeros_like(lo)
    qmin, qmax = int_range(spec.bits, spec.symmetric)
    if spec.symmetric:
        return torch.maximum(-lo, hi).clamp_min(_EPS) / qmax, torch.zeros_like(lo)
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)  # zero must be representable
    scale = (hi - lo).clamp_min(_EPS) / (qmax - qmin)
    return scale, (qmin - torch.round(lo / scale)).clamp(qmin, qmax)


def block_range(xb: torch.Tensor, spec: QuantSpec, dims: tuple[int, ...] = (-1,)) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block (min, max) over `dims` of blocked x, scaled by spec.clip_ratio."""
    lo = xb.amin(dim=dims, keepdim=True) * spec.clip_ratio
    hi = xb.amax(dim=dims, keepdim=True) * spec.clip_ratio
    return lo, hi


def quantize(xb: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Blocked float -> integer codes (as float tensor), or fp8 values for format fp8."""
    if spec.format == "fp8":
        return (xb / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    qmin, qmax = int_range(spec.bits, spec.symmetric)
    return torch.clamp(torch.round(xb / scale) + zero, qmin, qmax)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return ((q.to(scale.dtype) - zero) * scale).to(dtype)


def fake_quant(x: torch.Tensor, spec: QuantSpec, scale: torch.Tensor | None = None,
               zero: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize then dequantize x with spec; pass (scale, zero) for static ranges."""
    xb = blocks(x.float(), spec.granularity, spec.group_size)
    if scale is None and spec.symmetric and spec.format == "int":
        return _fake_quant_sym(xb, spec).to(x.dtype).reshape(x.shape)
    if scale is None:
        scale, zero = qparams_from_range(*block_range(xb, spec), spec)
    q = quantize(xb, scale, zero, spec)
    return dequantize(q, scale, zero, x.dtype).reshape(x.shape)


def _fake_quant_sym(xb: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Dynamic symmetric integer fake-quant of blocked xb in few passes (same result as the
    general path: scale = clip * absmax / qmax, codes clamped to [qmin, qmax])."""
    qmin, qmax = int_range(spec.bits, True)
    scale = (xb.abs().amax(dim=-1, keepdim=True) * spec.clip_ratio).clamp_min_(_EPS).div_(qmax)  # [R, G, 1]
    return torch.div(xb, scale).round_().clamp_(qmin, qmax).mul_(scale)


def quant_error(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Mean squared fake-quant error of x (a scalar)."""
    return (fake_quant(x, spec) - x).pow(2).mean()
