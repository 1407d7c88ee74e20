"""Pure tensor primitives: qparams, quantize, dequantize, fake-quant, stored weights.

The grid is bit-exact with compressed-tensors 0.20 (what llm-compressor writes and vLLM loads):
same code range, scale and zero-point formulas, operation order and computation dtype (the
convention is written out in docs/quantization.md, "Grid convention"). In short, per block:

    lo = min(min(x), 0), hi = max(max(x), 0)                     (0 is always representable)
    int codes in [-2^(b-1), 2^(b-1) - 1] for symmetric AND asymmetric; fp8 e4m3 values in [-448, 448]
    symmetric:  scale = max(|lo|, |hi|) / ((qmax - qmin) / 2),  zero = 0
    asymmetric: scale = (hi - lo) / (qmax - qmin),  zero = round(clamp(qmin - lo / scale, qmin, qmax))
    scale == 0 -> finfo(dtype).eps;  codes = round(clamp(x / scale + zero, qmin, qmax))  (half to even)
    x_hat = (codes - zero) * scale, everything in the input's own float dtype.

One block notion serves every granularity: a tensor x[..., D] is viewed as blocks[R, G, B]
and one (scale, zero) is shared by the B elements of each block:
  tensor  -> [1, 1, numel]         channel/token -> [rows, 1, D]      group g -> [rows, D/g, g]
(for a weight [out, in], "channel" means one scale per output row, i.e. per output channel).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from ..core.errors import QuantbenchError
from .spec import QuantSpec

FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8_DTYPE = torch.float8_e4m3fn
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


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


def int_range(bits: int, symmetric: bool = True) -> tuple[int, int]:
    """Integer code range: signed [-2^(b-1), 2^(b-1) - 1] for both symmetric and asymmetric
    schemes (compressed-tensors; an asymmetric scheme shifts it with a signed zero point)."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def code_range(spec: QuantSpec) -> tuple[float, float]:
    """(qmin, qmax) of the codes: the integer range, or the finite fp8 e4m3 range."""
    return (-FP8_MAX, FP8_MAX) if spec.format == "fp8" else tuple(float(v) for v in int_range(spec.bits))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype qparams and codes are computed in: the input's own float dtype (as compressed-tensors
    and llm-compressor's observers do), float32 for anything else."""
    return dtype if dtype in _FLOATS else torch.float32


def _check(spec: QuantSpec) -> None:
    if spec.format == "fp8" and not spec.symmetric:
        raise QuantbenchError("fp8 quantization is symmetric only (e4m3 with one scale per block, no zero "
                              "point: vLLM has no asymmetric fp8 kernels); set symmetric: true")


def _range_tensors(spec: QuantSpec, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(qmin, qmax) as 0-dim float32 tensors, as compressed-tensors' calculate_range builds them
    (dividing by a tensor, not a Python scalar, keeps the exact same kernels: on CUDA a Python
    scalar divisor becomes a multiplication by its reciprocal). Shared: never modify in place."""
    return _cached_range(*code_range(spec), device)


@lru_cache(maxsize=None)
def _cached_range(lo: float, hi: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(lo, device=device), torch.tensor(hi, device=device)


def _zero_point_dtype(spec: QuantSpec) -> torch.dtype:
    return FP8_DTYPE if spec.format == "fp8" else torch.int8


def _store_zero(zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Cast zero points to their stored dtype as compressed-tensors does (clamp, round, cast).
    A 0/0 zero point (an all-zero block, asymmetric) becomes 0: compressed-tensors casts that NaN
    to int8, which gives 0 on x86 (formally undefined); here it is explicit."""
    dt = _zero_point_dtype(spec)
    if dt == FP8_DTYPE:
        return zero.clamp(-FP8_MAX, FP8_MAX).to(dt)
    info = torch.iinfo(dt)
    return torch.round(torch.nan_to_num(zero, nan=0.0).clamp(info.min, info.max)).to(dt)


def _nonzero_scale(scale: torch.Tensor) -> torch.Tensor:
    """Exact-zero scales (all-zero blocks) -> finfo(dtype).eps; tiny non-zero scales are kept."""
    return torch.where(scale == 0, torch.finfo(scale.dtype).eps, scale)


def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) from per-block min/max (already clipped), computed in lo's dtype.

    scale has lo's dtype; zero is int8 (int formats) or float8_e4m3fn (fp8, always 0), the
    dtypes compressed-tensors stores. Symmetric: zero = 0.
    """
    _check(spec)
    lo = torch.min(lo, torch.zeros_like(lo))  # 0 must be representable
    hi = torch.max(hi, torch.zeros_like(hi))
    qmin, qmax = _range_tensors(spec, lo.device)
    span = qmax - qmin
    if spec.symmetric:
        absmax = torch.max(lo.abs(), hi.abs())
        scale = absmax / (span.to(absmax.dtype) / 2)
        zero = torch.zeros(scale.shape, device=lo.device, dtype=lo.dtype)
    else:
        scale = (hi - lo) / span.to(hi.dtype)
        zero = torch.clamp(qmin - lo / scale, qmin, qmax)  # before the eps fix, as compressed-tensors
    return _nonzero_scale(scale), _store_zero(zero, spec)


def block_range(xb: torch.Tensor, spec: QuantSpec, dims: tuple[int, ...] = (-1,)) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block (min, max) over `dims` of blocked x, scaled by spec.clip_ratio."""
    lo = xb.amin(dim=dims, keepdim=True) * spec.clip_ratio
    hi = xb.amax(dim=dims, keepdim=True) * spec.clip_ratio
    return lo, hi


def quantize(xb: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor:
    """Blocked float -> codes: integer values in xb / scale's promoted float dtype (int formats),
    or a float8_e4m3fn tensor (fp8). Order: divide, add zero, clamp, round (half to even)."""
    _check(spec)
    qmin, qmax = _range_tensors(spec, xb.device)
    scaled = xb / scale
    if zero is not None:
        scaled = scaled + zero.to(xb.dtype)
    scaled = torch.clamp(scaled, qmin, qmax)
    return scaled.to(FP8_DTYPE) if spec.format == "fp8" else torch.round(scaled)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """(codes - zero) * scale in scale's dtype, then cast to dtype."""
    out = q.to(scale.dtype)
    if zero is not None:
        out = out - zero.to(scale.dtype)
    return (out * scale).to(dtype)


def fake_quant(x: torch.Tensor, spec: QuantSpec, scale: torch.Tensor | None = None,
               zero: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize then dequantize x with spec; pass (scale, zero) for static ranges."""
    xb = blocks(x.to(compute_dtype(x.dtype)), spec.granularity, spec.group_size)
    if scale is None and spec.symmetric and spec.format == "int":
        return _fake_quant_sym(xb, spec).to(x.dtype).reshape(x.shape)
    if scale is None:
        scale, zero = qparams_from_range(*block_range(xb, spec), spec)
    q = quantize(xb, scale, zero, spec)
    return dequantize(q, scale, zero, x.dtype).reshape(x.shape)


def _fake_quant_sym(xb: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Dynamic symmetric integer fake-quant of blocked xb in few passes; bit-identical to the
    general path (max(|clip*min|, |clip*max|) == clip*max|x|, and zero = 0 adds nothing)."""
    qmin, qmax = _range_tensors(spec, xb.device)
    absmax = xb.abs().amax(dim=-1, keepdim=True) * spec.clip_ratio  # [R, G, 1]
    scale = _nonzero_scale(absmax.div_((qmax - qmin).to(xb.dtype) / 2))
    return torch.div(xb, scale).clamp_(qmin, qmax).round_().mul_(scale)


def quant_error(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Mean squared fake-quant error of x (a scalar)."""
    return (fake_quant(x, spec) - x).pow(2).mean()


@dataclass(frozen=True, eq=False)
class QTensor:
    """A weight as stored by compressed-tensors: codes (int8 for int formats, float8_e4m3fn for
    fp8) of the weight's shape; scale in the weight's dtype and zero_point (int8 / fp8) shaped
    [1] (tensor), [out, 1] (channel) or [out, in / group_size] (group)."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    spec: QuantSpec

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Float weights (scale's dtype unless dtype is given), equal to fake_quant(w, spec)."""
        qb = blocks(self.codes, self.spec.granularity, self.spec.group_size)  # [R, G, B]
        s = self.scale.reshape(qb.shape[0], qb.shape[1], 1)  # [R, G, 1]
        z = self.zero_point.reshape(qb.shape[0], qb.shape[1], 1)
        return dequantize(qb, s, z, dtype or self.scale.dtype).reshape(self.codes.shape)

    def storage_bits(self) -> float:
        """Codes at `bits` bits, scales at 16 bits, zero points at `bits` bits when asymmetric."""
        zero = 0 if self.spec.symmetric else self.zero_point.numel() * self.spec.bits
        return float(self.codes.numel() * self.spec.bits + self.scale.numel() * 16 + zero)


def quantize_weight(w: torch.Tensor, spec: QuantSpec, scale: torch.Tensor | None = None,
                    zero: torch.Tensor | None = None) -> QTensor:
    """The stored form of weight w [out, in] under spec (what export writes). Pass scale/zero
    (any shape holding one value per block, e.g. [R, G]) to store w on given qparams (GPTQ)."""
    wb = blocks(w.to(compute_dtype(w.dtype)), spec.granularity, spec.group_size)  # [R, G, B]
    if scale is None:
        scale, zero = qparams_from_range(*block_range(wb, spec), spec)  # [R, G, 1]
    else:
        scale = scale.reshape(wb.shape[0], wb.shape[1], 1).to(wb.dtype)
        zero = _store_zero(zero.reshape(scale.shape).to(wb.dtype) if zero is not None else torch.zeros_like(scale), spec)
    q = quantize(wb, scale, zero, spec)
    codes = (q if spec.format == "fp8" else q.to(torch.int8)).reshape(w.shape)
    shape = (1,) if spec.granularity == "tensor" else tuple(scale.shape[:2])  # [1] or [R, G]
    return QTensor(codes, scale.reshape(shape), zero.reshape(shape), spec)
