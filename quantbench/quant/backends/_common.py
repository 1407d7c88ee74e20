"""Helpers for real backends: replacing linears, measuring stored weight bytes."""
from __future__ import annotations

import torch
import torch.nn as nn


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


def weight_bytes(model: nn.Module) -> int:
    """Measured bytes of every parameter and buffer (tied ones once) plus backend scale state."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += tensor_bytes(t)
    return total + sum(module_state_bytes(m) for m in model.modules())


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
