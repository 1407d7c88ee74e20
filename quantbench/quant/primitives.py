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
A weight in `block` granularity is zero-padded to square g x g tiles and viewed as [out/g, in/g, g*g].

The microscaling formats (nvfp4, mxfp4, mxfp8) take their scales from quant/microscaling.py
(fp8 scales under an fp32 global scale, e8m0 exponents) and round to e2m1 (fp4) or e4m3 (mxfp8);
every function here takes an optional `global_scale` (NVFP4 only; None elsewhere).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from ..core.errors import QuantbenchError
from .microscaling import (
    FP4_MAX,
    FP8_DTYPE,
    FP8_MAX,
    cast_to_fp4,
    from_blocks_2d,
    global_scale,
    mx_scale,
    nvfp4_scale,
    to_blocks_2d,
)
from .spec import QuantSpec

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


def spec_blocks(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """x as spec's [R, G, B] blocks: `blocks`, or padded square tiles for granularity 'block' (a copy)."""
    if spec.granularity == "block":
        return to_blocks_2d(x, spec.group_size)  # [out/g, in/g, g*g]
    return blocks(x, spec.granularity, spec.group_size)


def unblock(xb: torch.Tensor, shape: torch.Size | tuple[int, ...], spec: QuantSpec) -> torch.Tensor:
    """Inverse of spec_blocks: [R, G, B] -> x of `shape`."""
    return from_blocks_2d(xb, shape, spec.group_size) if spec.granularity == "block" else xb.reshape(shape)


def int_range(bits: int, symmetric: bool = True) -> tuple[int, int]:
    """Integer code range: signed [-2^(b-1), 2^(b-1) - 1] for both symmetric and asymmetric
    schemes (compressed-tensors; an asymmetric scheme shifts it with a signed zero point)."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def code_range(spec: QuantSpec) -> tuple[float, float]:
    """(qmin, qmax) of the codes: the integer range, the finite fp8 e4m3 range (fp8, mxfp8), or e2m1's."""
    if spec.format in ("fp8", "mxfp8"):
        return -FP8_MAX, FP8_MAX
    if spec.format in ("nvfp4", "mxfp4"):
        return -FP4_MAX, FP4_MAX
    return tuple(float(v) for v in int_range(spec.bits))


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
    """int8 (int), float8_e4m3fn (fp8, nvfp4), uint8 (mx): compressed-tensors' zp_dtype."""
    if spec.format in ("fp8", "nvfp4"):
        return FP8_DTYPE
    return torch.uint8 if spec.format in ("mxfp4", "mxfp8") else torch.int8


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


def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec,
                       global_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) from per-block min/max (already clipped), computed in lo's dtype.

    scale has lo's dtype; zero is int8 (int formats) or float8_e4m3fn (fp8, always 0), the
    dtypes compressed-tensors stores. Symmetric: zero = 0. Microscaling formats: `_micro_qparams`
    (nvfp4 needs the tensor's global_scale).
    """
    _check(spec)
    lo = torch.min(lo, torch.zeros_like(lo))  # 0 must be representable
    hi = torch.max(hi, torch.zeros_like(hi))
    if spec.micro:
        return _micro_qparams(lo, hi, spec, global_scale)
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


def _micro_qparams(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec, gscale: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """nvfp4: fp8(global * absmax / 6) (fp32); mx: 2^(e8m0 - 127) in lo's dtype. Zero points 0 in the
    format's zp dtype (fp8 / uint8)."""
    absmax = torch.max(lo.abs(), hi.abs())
    if spec.format == "nvfp4":
        if gscale is None:
            raise ValueError("nvfp4 qparams need the tensor's global scale")
        scale = nvfp4_scale(absmax, gscale)
    else:
        scale = mx_scale(absmax, spec.bits)
    return scale, torch.zeros(scale.shape, device=lo.device, dtype=_zero_point_dtype(spec))


def tensor_global_scale(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor | None:
    """NVFP4's fp32 global scale [1] from x's own min and max (a weight's, as llm-compressor's observer
    takes it); None for every other format."""
    return global_scale(x.amin(), x.amax()) if spec.format == "nvfp4" else None


def block_range(xb: torch.Tensor, spec: QuantSpec, dims: tuple[int, ...] = (-1,)) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block (min, max) over `dims` of blocked x, scaled by spec.clip_ratio."""
    lo = xb.amin(dim=dims, keepdim=True) * spec.clip_ratio
    hi = xb.amax(dim=dims, keepdim=True) * spec.clip_ratio
    return lo, hi


def quantize(xb: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec,
             global_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Blocked float -> codes: integer values in xb / scale's promoted float dtype (int formats),
    a float8_e4m3fn tensor (fp8, mxfp8), or e2m1 values in that float dtype (nvfp4, mxfp4).
    Order: (scale / global scale,) divide, add zero, clamp, round (half to even)."""
    _check(spec)
    qmin, qmax = _range_tensors(spec, xb.device)
    if global_scale is not None:
        scale = scale / global_scale
    scaled = xb / scale
    if zero is not None:
        scaled = scaled + zero.to(xb.dtype)
    scaled = torch.clamp(scaled, qmin, qmax)
    if spec.format in ("fp8", "mxfp8"):
        return scaled.to(FP8_DTYPE)
    return cast_to_fp4(scaled) if spec.format in ("nvfp4", "mxfp4") else torch.round(scaled)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, dtype: torch.dtype,
               global_scale: torch.Tensor | None = None) -> torch.Tensor:
    """(codes - zero) * scale (divided by the global scale, if any) in scale's dtype, then cast to dtype."""
    if global_scale is not None:
        scale = scale / global_scale
    out = q.to(scale.dtype)
    if zero is not None:
        out = out - zero.to(scale.dtype)
    return (out * scale).to(dtype)


def fake_quant(x: torch.Tensor, spec: QuantSpec, scale: torch.Tensor | None = None,
               zero: torch.Tensor | None = None, global_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize then dequantize x with spec; pass (scale, zero) for static ranges. nvfp4: pass the
    calibrated global scale (activations); without one, x's own is used (as for a weight)."""
    xc = x.to(compute_dtype(x.dtype))
    xb = spec_blocks(xc, spec)
    if scale is None and spec.symmetric and spec.format == "int":
        return unblock(_fake_quant_sym(xb, spec).to(x.dtype), x.shape, spec)
    if global_scale is None:
        global_scale = tensor_global_scale(xc, spec)
    if scale is None:
        scale, zero = qparams_from_range(*block_range(xb, spec), spec, global_scale)
    q = quantize(xb, scale, zero, spec, global_scale)
    return unblock(dequantize(q, scale, zero, x.dtype, global_scale), x.shape, spec)


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
    fp8 and mxfp8, e2m1 values as floats for nvfp4 / mxfp4) of the weight's shape; scale and
    zero_point (int8 / fp8 / uint8) shaped [1] (tensor), [out, 1] (channel), [out, in / group_size]
    (group) or [ceil(out / g), ceil(in / g)] (block). The scale is in the weight's dtype (nvfp4: fp32
    holding e4m3 values; mx: powers of two); global_scale is nvfp4's fp32 [1], else None."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    spec: QuantSpec
    global_scale: torch.Tensor | None = None

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Float weights (scale's dtype unless dtype is given), equal to fake_quant(w, spec)."""
        qb = spec_blocks(self.codes, self.spec)  # [R, G, B]
        s = self.scale.reshape(qb.shape[0], qb.shape[1], 1)  # [R, G, 1]
        z = self.zero_point.reshape(qb.shape[0], qb.shape[1], 1)
        out = dequantize(qb, s, z, dtype or self.scale.dtype, self.global_scale)
        return unblock(out, self.codes.shape, self.spec)

    def storage_bits(self) -> float:
        """int / fp8: codes at `bits` bits, scales at 16 bits, zero points at `bits` bits when asymmetric.
        Microscaling: codes at `bits` bits, scales at 8 bits (e4m3 or e8m0), nvfp4's global scale at 32."""
        if self.spec.micro:
            glob = 32 if self.global_scale is not None else 0
            return float(self.codes.numel() * self.spec.bits + self.scale.numel() * 8 + glob)
        zero = 0 if self.spec.symmetric else self.zero_point.numel() * self.spec.bits
        return float(self.codes.numel() * self.spec.bits + self.scale.numel() * 16 + zero)


def quantize_weight(w: torch.Tensor, spec: QuantSpec, scale: torch.Tensor | None = None,
                    zero: torch.Tensor | None = None, global_scale: torch.Tensor | None = None) -> QTensor:
    """The stored form of weight w [out, in] under spec (what export writes). Pass scale/zero
    (any shape holding one value per block, e.g. [R, G]) to store w on given qparams (GPTQ).
    nvfp4: the global scale is w's own (llm-compressor's observer), or `global_scale` when given (GPTQ
    fixes it from the weights it started from, not from the ones it rounded)."""
    wc = w.to(compute_dtype(w.dtype))
    wb = spec_blocks(wc, spec)  # [R, G, B]
    gscale = tensor_global_scale(wc, spec)
    if global_scale is not None and gscale is not None:
        gscale = global_scale
    if scale is None:
        scale, zero = qparams_from_range(*block_range(wb, spec), spec, gscale)  # [R, G, 1]
    else:
        scale = scale.reshape(wb.shape[0], wb.shape[1], 1).to(wb.dtype)
        zero = _store_zero(zero.reshape(scale.shape).to(wb.dtype) if zero is not None else torch.zeros_like(scale), spec)
    q = quantize(wb, scale, zero, spec, gscale)
    q = q.to(torch.int8) if spec.format == "int" else q if q.dtype == FP8_DTYPE else q.to(wc.dtype)  # fp4: w's dtype
    codes = unblock(q, w.shape, spec)
    shape = (1,) if spec.granularity == "tensor" else tuple(scale.shape[:2])  # [1] or [R, G]
    return QTensor(codes, scale.reshape(shape), zero.reshape(shape), spec, gscale)
