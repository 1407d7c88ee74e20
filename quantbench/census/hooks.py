"""Forward hooks that are always removed, and eager attention only while it is needed."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch.nn as nn


@contextmanager
def forward_hooks(pairs: list[tuple[nn.Module, Callable]]) -> Iterator[None]:
    """Register (module, hook(module, inputs, output)) pairs; remove them on exit, even on error."""
    handles = []
    try:
        for mod, fn in pairs:
            handles.append(mod.register_forward_hook(fn))
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Switch to eager attention (which returns probabilities) and back."""
    before = getattr(model.config, "_attn_implementation", None)
    if before == "eager" or before is None:
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def first_tensor(output):
    """A module's main output tensor (decoder layers return a tensor or a tuple)."""
    return output[0] if isinstance(output, (tuple, list)) else output
