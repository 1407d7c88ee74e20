"""Hooks that are always removed (on the way out of a `with`, even on error), streaming input
capture, and eager attention only while it is needed."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
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


@contextmanager
def input_hooks(mods: dict[str, nn.Module], fn: Callable[[str, torch.Tensor], None],
                skip_first: int = 0) -> Iterator[dict[str, str]]:
    """fn(name, x[N, D]) on every call's input of each module; hooks removed on exit, even on error.

    skip_first drops the first positions of every sequence (e.g. the BOS/attention-sink token).
    Modules called back to back on the very same input tensor (q/k/v, gate/up) are reported once,
    under the first name; the yielded dict maps the others (aliases) to it.
    """
    handles = []
    last: dict[str, object] = {"x": None, "name": None}
    aliases: dict[str, str] = {}

    def make(name: str):
        def hook(_m, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            if x is last["x"]:
                aliases[name] = last["name"]
                return
            last["x"], last["name"] = x, name
            xs = x.detach()[:, skip_first:] if skip_first and x.dim() == 3 else x.detach()  # drop leading positions
            fn(name, xs.reshape(-1, x.shape[-1]).float())  # [B, T, D] -> [N, D]
        return hook

    try:
        for name, mod in mods.items():
            handles.append(mod.register_forward_pre_hook(make(name), with_kwargs=True))
        yield aliases
    finally:
        last["x"] = None
        for h in handles:
            h.remove()
