"""Deployed size, measured on the model as applied, tensor by tensor.

- a simulated QuantLinear: its stored weight (codes at `bits` bits, 16-bit scales, zero points
  when asymmetric; microscaling formats: 8-bit e4m3 / e8m0 scales and nvfp4's 32-bit global scale;
  16 bits per weight when not quantized), 16-bit bias, static activation scales (nvfp4: the 32-bit
  input global scale), and its keep policies' side tables (e.g. an outlier-channel bitmask);
- a real-kernel module (bitsandbytes, quanto): its quantized tensors as stored (data + scales),
  its plain float tensors at 16 bits;
- every other parameter and persistent buffer (embeddings, norms, excluded or untied layers,
  online rotation factors): 16 bits per element, tied tensors once;
- model-level side tables declared in the Effects (e.g. kept token ids).

bits_per_weight = total bits / number of parameters of the FP model as loaded, so a mitigation that
adds or unties parameters (rotation unties lm_head) shows up as a larger number.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .backends._common import module_state_bytes, tensor_bytes
from .effects import Effects
from .plan import Plan
from .qlinear import QuantLinear

FP_BITS = 16.0  # how unquantized tensors are deployed (bf16/fp16)


@dataclass
class Size:
    total_bits: float
    n_params_fp: int
    per_linear: dict[str, float] = field(default_factory=dict)  # planned linear -> bits

    @property
    def bytes(self) -> int:
        return int(self.total_bits / 8)

    @property
    def bits_per_weight(self) -> float:
        return self.total_bits / max(self.n_params_fp, 1)

    @property
    def mb(self) -> float:
        return self.bytes / 2**20


def _is_plain_float(t: torch.Tensor) -> bool:
    return t.is_floating_point() and type(t) in (torch.Tensor, nn.Parameter) and not hasattr(t, "quant_state")


def _tensor_bits(t: torch.Tensor) -> float:
    """Plain float tensors at FP_BITS per element; quantized ones (int8, 4-bit packed, quanto
    subclasses with their scales) as actually stored."""
    return FP_BITS * t.numel() if _is_plain_float(t) else 8.0 * tensor_bytes(t)


def _own_tensors(mod: nn.Module) -> list[torch.Tensor]:
    bufs = [b for n, b in mod._buffers.items() if b is not None and n not in mod._non_persistent_buffers_set]
    return [*mod.parameters(recurse=False), *bufs]


def measure_size(model: nn.Module, plan: Plan, effects: Effects, n_params_fp: int) -> Size:
    """Bits of the model as applied (see module doc)."""
    seen: set[int] = set()
    per_linear: dict[str, float] = {}
    total = effects.side_bits
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            bits = mod.storage_bits()
        elif name in plan.linears and plan.linears[name].quantized:
            bits = sum(_tensor_bits(t) for t in _own_tensors(mod)) + 8.0 * module_state_bytes(mod)
        else:
            continue
        seen.update(id(t) for t in _own_tensors(mod))
        per_linear[name] = bits
        total += bits
    for mod in model.modules():
        for t in _own_tensors(mod):
            if id(t) not in seen:
                seen.add(id(t))
                total += _tensor_bits(t)
    return Size(total, n_params_fp, per_linear)
