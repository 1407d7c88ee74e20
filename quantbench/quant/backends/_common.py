"""Helpers shared by backends: online transforms carried over to a replacement module, and the
bytes a (possibly quantized subclass) tensor really stores."""
from __future__ import annotations

import torch
import torch.nn as nn

from ...modeling.surgery import attach_online


def reattach_online(old: nn.Module, new: nn.Module) -> None:
    """If `old` had an online input transform (e.g. rotation), `new` gets the same one."""
    t = getattr(old, "input_transform", None)
    if t is not None:
        attach_online(new, t)


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a (possibly quantized subclass) tensor stores, including its scales."""
    if hasattr(t, "__tensor_flatten__") and type(t) is not torch.Tensor and type(t) is not nn.Parameter:
        names, _ = t.__tensor_flatten__()  # quanto QTensor: _data, _scale, _shift
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    n = t.numel() * t.element_size()
    qs = getattr(t, "quant_state", None)  # bitsandbytes Params4bit
    if qs is not None:
        n += sum(v.numel() * v.element_size() for v in qs.as_dict(packed=True).values() if torch.is_tensor(v))
    return n


def module_state_bytes(mod: nn.Module) -> int:
    """bitsandbytes Linear8bitLt keeps its row scales (SCB) in module.state."""
    st = getattr(mod, "state", None)
    scb = getattr(st, "SCB", None) if st is not None else None
    return scb.numel() * scb.element_size() if torch.is_tensor(scb) else 0


def stored_bits(mod: nn.Module) -> float:
    """Bits a real-kernel module stores: every own tensor as stored (quantized data + scales)."""
    own = [*mod.parameters(recurse=False), *mod.buffers(recurse=False)]
    return 8.0 * (sum(tensor_bytes(t) for t in own) + module_state_bytes(mod))
