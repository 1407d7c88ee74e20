"""Model surgery, in one place: what counts as a linear layer, its weight as [out, in], in-place
scaling, module replacement, and running calibration batches through a model.

GPT-2's Conv1D stores its weight as [in, out]; every helper here hides that, so the rest of the
code sees [out, in] ("Linear layout") everywhere.
"""
from __future__ import annotations

import fnmatch
import weakref
from typing import Callable

import torch
import torch.nn as nn


def is_conv1d(mod: nn.Module) -> bool:
    return type(mod).__name__ == "Conv1D"


def is_linear(mod: nn.Module) -> bool:
    return isinstance(mod, nn.Linear) or is_conv1d(mod)


def in_features(mod: nn.Module) -> int:
    return mod.weight.shape[0] if is_conv1d(mod) else mod.weight.shape[1]


def out_features(mod: nn.Module) -> int:
    return mod.weight.shape[1] if is_conv1d(mod) else mod.weight.shape[0]


def weight_view(mod: nn.Module) -> torch.Tensor:
    """The weight in [out, in] layout, detached, without a copy (Conv1D: a transposed view)."""
    w = mod.weight.detach()
    return w.t() if is_conv1d(mod) else w


def get_weight(mod: nn.Module) -> torch.Tensor:
    """A float32 copy of the weight in [out, in] layout."""
    return weight_view(mod).float().clone()


def set_weight(mod: nn.Module, w: torch.Tensor) -> None:
    """Write an [out, in] weight back (in the module's own layout and dtype)."""
    w = w.t() if is_conv1d(mod) else w
    mod.weight.data.copy_(w.to(mod.weight.dtype))


def scale_in(mod: nn.Module, s: torch.Tensor) -> None:
    """W[:, j] *= s[j] (the module's input channel j)."""
    w = get_weight(mod)  # [out, in]
    set_weight(mod, w * s.to(w)[None, :])


def scale_out(mod: nn.Module, s: torch.Tensor) -> None:
    """W[i, :] *= s[i] and b[i] *= s[i] (output channel i; works for norms too: weight [D])."""
    if mod.weight.dim() == 1:
        mod.weight.data.mul_(s.to(mod.weight))
    else:
        w = get_weight(mod)  # [out, in]
        set_weight(mod, w * s.to(w)[:, None])
    if getattr(mod, "bias", None) is not None:
        mod.bias.data.mul_(s.to(mod.bias))


def as_linear(module: nn.Module) -> nn.Linear:
    """nn.Linear as is; GPT-2's Conv1D as an equivalent nn.Linear (weight [out, in])."""
    if isinstance(module, nn.Linear):
        return module
    w = get_weight(module).to(module.weight.dtype)
    lin = nn.Linear(w.shape[1], w.shape[0], bias=module.bias is not None, device=w.device, dtype=w.dtype)
    lin.weight.data.copy_(w)
    if module.bias is not None:
        lin.bias.data.copy_(module.bias.data)
    return lin


_ON_REPLACE: "weakref.WeakKeyDictionary[nn.Module, Callable[[nn.Module, nn.Module], None]]" = \
    weakref.WeakKeyDictionary()


def on_replace(model: nn.Module, fn: Callable[[nn.Module, nn.Module], None] | None) -> None:
    """fn(model, old) is called after replace_module takes `old` out of `model` (None: no callback).
    quantbench.modeling.pristine uses it to free the storage of replaced weights it can read back."""
    if fn is None:
        _ON_REPLACE.pop(model, None)
    else:
        _ON_REPLACE[model] = fn


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    old = getattr(owner, child, None)
    setattr(owner, child, new)
    fn = _ON_REPLACE.get(model)
    if fn is not None and isinstance(old, nn.Module) and old is not new:
        fn(model, old)


def attach_online(mod: nn.Module, transform: nn.Module) -> None:
    """x -> transform(x) before `mod` runs (an online transform such as a Hadamard rotation of the
    input): a forward pre-hook, with the transform as the submodule `input_transform` so it moves
    with the model. Backends call this again on the module they put in its place."""
    mod.add_module("input_transform", transform)
    mod.register_forward_pre_hook(_apply_input_transform)


def _apply_input_transform(mod: nn.Module, args: tuple) -> tuple:
    return (mod.input_transform(args[0]), *args[1:])


def matches(name: str, pattern: str) -> bool:
    """Module-name pattern: exact, a dotted suffix ('lm_head' matches 'model.lm_head'), a glob,
    or a regular expression after 're:' (full match)."""
    if pattern.startswith("re:"):
        import re

        return re.fullmatch(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern) or fnmatch.fnmatchcase(name, pattern)


def linear_modules(model: nn.Module, exclude: tuple[str, ...] = ()) -> list[tuple[str, nn.Module]]:
    """Every linear layer (nn.Linear or Conv1D) not matched by an exclude pattern, in model order."""
    return [(n, m) for n, m in model.named_modules()
            if is_linear(m) and not any(matches(n, p) for p in exclude)]


def model_device(model: nn.Module) -> torch.device:
    """Where input ids go. Under an accelerate device map whose input embedding is offloaded ('disk', or
    'cpu' beside a GPU) the first parameter sits on the meta device: the embedding's execution device
    then; else the first parameter not on meta (the CPU when there is none)."""
    try:
        emb = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        emb = None
    h = getattr(emb, "_hf_hook", None)
    for hook in getattr(h, "hooks", None) or ([h] if h is not None else []):  # a SequentialHook holds several
        dev = getattr(hook, "execution_device", None)
        if dev is not None:
            return torch.device(f"cuda:{dev}" if isinstance(dev, int) else dev)
    return next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))


def no_cache(model: nn.Module) -> dict:
    """{'use_cache': False} when the model's forward takes it: a pass that needs no KV cache then does not
    keep one for every layer (memory growing with depth); {} for forwards that do not know the keyword."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    takes = "use_cache" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return {"use_cache": False} if takes else {}


@torch.no_grad()
def run_batches(model: nn.Module, batches: torch.Tensor, batch_size: int, device: torch.device | None = None) -> None:
    """Forward every batch of token ids [N, T] through the model (outputs discarded)."""
    dev = device or model_device(model)
    for i in range(0, len(batches), batch_size):
        model(input_ids=batches[i: i + batch_size].to(dev), **no_cache(model))
