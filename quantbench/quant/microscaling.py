"""The float formats beyond e4m3 per block: fp4 e2m1 values, NVFP4's fp8 scales under an fp32 global
scale, OCP microscaling's e8m0 shared exponents, and 2-D weight blocks (DeepSeek-style fp8 128x128).

Each function is the same arithmetic, in the same order and dtype, as compressed-tensors 0.20
(`cast_to_fp4`, `generate_gparam`, `generate_mx_scales`/`round_to_power_2`/`maybe_convert_from_mx_exp`,
`calculate_qparams` with `scale_dtype`, `maybe_pad_tensor_for_block_quant` and `_process_block`);
tests/test_fp_formats.py checks codes, scales and global scales against those functions with
torch.equal. The conventions are written out in docs/quantization.md ("Microscaling and block formats").

    nvfp4:  scale = fp8(global * absmax / 6), global = 448 * 6 / absmax(tensor) (fp32), codes e2m1
    mxfp4:  scale = 2^(e - 127), e = 127 + floor(log2(pow2(absmax))) - 2 (uint8), codes e2m1
    mxfp8:  the same with offset 8 (floor(log2 448)), codes e4m3
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

FP4_MAX = 6.0  # largest e2m1 value
FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8_DTYPE = torch.float8_e4m3fn
MX_OFFSET = {4: int(math.floor(math.log2(FP4_MAX))), 8: int(math.floor(math.log2(FP8_MAX)))}  # 2, 8
FP4_MANTISSA = 1  # e2m1: the mantissa width compressed-tensors rounds every MX block max with (mxfp8 too)
NVFP4_SCALE_EPS = 0.125  # compressed-tensors' replacement for a zero fp8 scale (_get_dtype_eps(float8_e4m3fn))
MX_SCALE_EPS = 1.0  # ... and for a zero MX scale (_get_dtype_eps(uint8))
# (view dtype, mantissa bits, exponent bits) of each float dtype, for rounding to a power of two
_BITS = {torch.bfloat16: (torch.int16, 7, 8), torch.float16: (torch.int16, 10, 5),
         torch.float32: (torch.int32, 23, 8), torch.float64: (torch.int64, 52, 11)}


def cast_to_fp4(x: torch.Tensor) -> torch.Tensor:
    """Nearest e2m1 value (0, 0.5, 1, 1.5, 2, 3, 4, 6 and negatives; ties to even) of x, already
    clamped to [-6, 6], in x's dtype. Steps of 0.5 below 2, 1 below 4, 2 up to 6: each a
    round-half-to-even of an exact multiple, which is compressed-tensors' threshold table."""
    a = x.abs()
    q = torch.where(a < 2, torch.round(a * 2) / 2, torch.where(a < 4, torch.round(a), torch.round(a / 2) * 2))
    return q * torch.sign(x)


def global_scale(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """NVFP4's fp32 global scale [1] from a tensor's min and max (generate_gparam: 448 * 6 / absmax,
    computed in lo's dtype, absmax floored at finfo.tiny, NaN/inf -> 1)."""
    lo = torch.min(lo, torch.zeros_like(lo))
    hi = torch.max(hi, torch.zeros_like(hi))
    absmax = torch.max(torch.abs(lo), torch.abs(hi))
    absmax = torch.clamp(absmax, min=torch.finfo(absmax.dtype).tiny)
    gs = FP8_MAX * FP4_MAX / absmax
    return torch.nan_to_num(gs, nan=1.0, posinf=1.0, neginf=1.0).to(torch.float32).reshape([1])


def nvfp4_scale(absmax: torch.Tensor, gscale: torch.Tensor) -> torch.Tensor:
    """Per-block scale on the e4m3 grid: fp8(global * absmax / 6), in the promoted dtype (fp32);
    a zero scale becomes 0.125."""
    scale = absmax / (torch.tensor(2 * FP4_MAX, device=absmax.device).to(absmax.dtype) / 2)
    scale = gscale * scale
    scale = torch.clamp(scale, -FP8_MAX, FP8_MAX).to(FP8_DTYPE).to(scale.dtype)
    return torch.where(scale == 0, torch.tensor(NVFP4_SCALE_EPS, dtype=scale.dtype, device=scale.device), scale)


def round_to_power_2(x: torch.Tensor) -> torch.Tensor:
    """x >= 0 rounded to a power of two on its own bits: the exponent is kept and bumped by one where
    the mantissa's top bits reach e2m1's rounding threshold (compressed-tensors' round_to_power_2)."""
    view, mantissa, exponent = _BITS[x.dtype]
    bits = x.view(view).to(torch.int64 if view == torch.int64 else torch.int32)
    add = 1 << (mantissa - FP4_MANTISSA - 1)
    mask = ((1 << (exponent + 1)) - 1) << mantissa
    return torch.bitwise_and(bits + add, mask).to(view).view(x.dtype)


def mx_exponent(absmax: torch.Tensor, bits: int) -> torch.Tensor:
    """The biased e8m0 exponent (0..255, as uint8) of each block's shared scale."""
    e = 127 + torch.floor(torch.log2(round_to_power_2(absmax))) - MX_OFFSET[bits]
    return torch.round(torch.clamp(e, 0, 255)).to(torch.uint8)


def mx_scale(absmax: torch.Tensor, bits: int) -> torch.Tensor:
    """The shared power-of-two scale 2^(e - 127) in absmax's dtype; a zero scale (underflow) becomes 1."""
    e = mx_exponent(absmax, bits).to(absmax.dtype)
    scale = (2.00 ** ((e.to(torch.int32) - 127).to(torch.float))).to(absmax.dtype)
    return torch.where(scale == 0, torch.tensor(MX_SCALE_EPS, dtype=scale.dtype, device=scale.device), scale)


def to_blocks_2d(w: torch.Tensor, b: int) -> torch.Tensor:
    """w [out, in] zero-padded to multiples of b and viewed as [out/b, in/b, b*b] square blocks (a copy)."""
    rows, cols = w.shape
    w = F.pad(w, (0, (b - cols % b) % b, 0, (b - rows % b) % b))
    rb, cb = w.shape[0] // b, w.shape[1] // b
    return w.reshape(rb, b, cb, b).transpose(1, 2).reshape(rb, cb, b * b)  # [Rb, Cb, b*b]


def from_blocks_2d(xb: torch.Tensor, shape: torch.Size | tuple[int, ...], b: int) -> torch.Tensor:
    """Inverse of to_blocks_2d: [Rb, Cb, b*b] -> [out, in] (padding cut off)."""
    rb, cb = xb.shape[0], xb.shape[1]
    full = xb.reshape(rb, cb, b, b).transpose(1, 2).reshape(rb * b, cb * b)
    return full[: shape[0], : shape[1]].contiguous()
