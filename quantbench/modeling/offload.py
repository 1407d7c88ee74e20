"""Modules accelerate offloaded (device_map entries "disk", or "cpu" beside a GPU): their parameters sit
on the meta device and an AlignDevicesHook loads them from its weights map for each forward.

A forward through such a model works as is (the hooks stream the weights in). What reads or rewrites
weights (the census's weight statistics, mitigations, backends) needs them real: `onloaded(model)`
brings every offloaded module's tensors onto its execution device and takes its hook off for the
duration; on exit the meta parameters and hooks come back (quantbench.modeling.pristine does the same after a
recipe). While onloaded, the offloaded part of the model is held in memory.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn as nn


def _hook(module: nn.Module):
    """The module's AlignDevicesHook that offloads it (None when it is not offloaded)."""
    h = getattr(module, "_hf_hook", None)
    hooks = getattr(h, "hooks", None) or ([h] if h is not None else [])  # SequentialHook holds several
    return next((x for x in hooks if getattr(x, "offload", False) and getattr(x, "weights_map", None) is not None), None)


def offloaded_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if _hook(m) is not None]


def is_offloaded(model: nn.Module) -> bool:
    return any(t.device.type == "meta" for t in model.parameters())


def offloaded_value(module: nn.Module, name: str) -> torch.Tensor | None:
    """The stored value of an offloaded tensor of `module` (its own parameter or buffer `name`), or None."""
    h = _hook(module)
    if h is None or name not in h.weights_map:
        return None
    return h.weights_map[name]


@torch.no_grad()
def onload(model: nn.Module) -> list[tuple[nn.Module, dict]]:
    """Offloaded modules' tensors onto their execution devices, their hooks removed. Returns what
    `reload` needs to undo it: each changed module with a copy of its previous __dict__."""
    from accelerate.utils import set_module_tensor_to_device

    from .pristine import copy_module_dict

    changed = []
    for m in offloaded_modules(model):
        h = _hook(m)
        changed.append((m, copy_module_dict(m.__dict__)))
        dev = h.execution_device if h.execution_device is not None else torch.device("cpu")
        for name, t in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]:
            if t is not None and t.device.type == "meta" and name in h.weights_map:
                set_module_tensor_to_device(m, name, dev, value=h.weights_map[name])
        d = m.__dict__
        d.pop("_hf_hook", None)
        old = d.pop("_old_forward", None)
        if old is not None:
            d["forward"] = old
    return changed


def reload(changed: list[tuple[nn.Module, dict]]) -> None:
    """Undo `onload`: the meta parameters and the offload hooks come back."""
    from .pristine import copy_module_dict

    for m, saved in changed:
        m.__dict__.clear()
        m.__dict__.update(copy_module_dict(saved))


@contextmanager
def onloaded(model: nn.Module) -> Iterator[nn.Module]:
    changed = onload(model)
    try:
        yield model
    finally:
        reload(changed)


__all__ = ["onloaded", "onload", "reload", "is_offloaded", "offloaded_modules", "offloaded_value"]
