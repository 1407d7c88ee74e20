"""A weight as a deployment format stores it: integer (or fp8) codes, scales and zero points.

    codes [out, in]   int8 for int formats (values in the spec's integer range), float8_e4m3fn for fp8
    scale [out, G]    G = in / group_size (group), 1 (channel); [1, 1] for tensor
    zero  [out, G]    integer zero points (all 0 when symmetric), same shape as scale

Simulation dequantizes it, export writes it, size accounting counts it. Mitigations that finish a
weight themselves (GPTQ) hand one over in their Effects, so nothing re-rounds it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .primitives import block_range, blocks, dequantize, qparams_from_range, quantize
from .spec import QuantSpec


@dataclass(frozen=True)
class QTensor:
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    spec: QuantSpec

    def _blocked(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cb = blocks(self.codes, self.spec.granularity, self.spec.group_size)  # [R, G, B]
        return cb, self.scale[..., None], self.zero[..., None]  # [R, G, 1]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[out, in] weight on the grid, in `dtype`."""
        cb, s, z = self._blocked()
        return dequantize(cb, s, z, dtype).reshape(self.codes.shape)

    def storage_bits(self) -> float:
        """Codes at `bits` bits, scales at 16 bits, zero points at `bits` bits when asymmetric."""
        n_codes = self.codes.numel() * self.spec.bits
        n_scale = self.scale.numel() * 16
        n_zero = 0 if self.spec.symmetric else self.zero.numel() * self.spec.bits
        return float(n_codes + n_scale + n_zero)


def quantize_weight(w: torch.Tensor, spec: QuantSpec, scale: torch.Tensor | None = None,
                    zero: torch.Tensor | None = None) -> QTensor:
    """w [out, in] -> QTensor on spec's grid; pass scale/zero [R, G] to use given qparams."""
    wb = blocks(w.float(), spec.granularity, spec.group_size)  # [R, G, B]
    if scale is None:
        s, z = qparams_from_range(*block_range(wb, spec), spec)  # [R, G, 1]
    else:
        s, z = scale[..., None].float(), zero[..., None].float()
    q = quantize(wb, s, z, spec)
    codes = q if spec.format == "fp8" else q.to(torch.int8)
    return QTensor(codes.reshape(w.shape), s[..., 0], z[..., 0], spec)
