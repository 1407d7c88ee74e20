"""Apply a Recipe to a model: check it, run its mitigations in order, then quantize."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..arch import ArchSpec, arch_of
from ..errors import QuantbenchError
from . import backends, mitigations
from .qlinear import QuantLinear
from .spec import Recipe


@dataclass
class QuantContext:
    """What mitigations and backends may need besides the model."""

    recipe: Recipe
    arch: ArchSpec | None
    device: torch.device
    batch_size: int = 4
    prequantized: set[str] = field(default_factory=set)  # linears whose weights a mitigation already quantized
    notes: dict = field(default_factory=dict)  # per-mitigation facts recorded in the result row


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"


def excluded(name: str, patterns: tuple[str, ...]) -> bool:
    return any(name == p or name.endswith("." + p) or fnmatch.fnmatch(name, p) for p in patterns)


def target_linears(model: nn.Module, recipe: Recipe) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if _is_linear(m) and not excluded(n, recipe.exclude)]


def check_recipe(model: nn.Module, recipe: Recipe) -> None:
    """Reject impossible settings before any work, naming the recipe and layer."""
    for m in recipe.mitigations:
        if m.name not in mitigations.known():
            raise QuantbenchError(f"recipe '{recipe.name}': unknown mitigation '{m.name}' (known: {', '.join(mitigations.known()) or 'none'})")
    if recipe.backend not in backends.known():
        raise QuantbenchError(f"recipe '{recipe.name}': unknown backend '{recipe.backend}' (known: {', '.join(backends.known())})")
    if recipe.kv is not None and recipe.backend == "simulated" and "kv" not in mitigations.known():
        raise QuantbenchError(f"recipe '{recipe.name}': KV-cache quantization is not available in this version")
    for spec, what in ((recipe.weights, "weights"), (recipe.activations, "activations")):
        if spec is None or spec.granularity != "group":
            continue
        for name, mod in target_linears(model, recipe):
            fan_in = mod.weight.shape[0] if type(mod).__name__ == "Conv1D" else mod.in_features
            if fan_in % spec.group_size:
                raise QuantbenchError(
                    f"recipe '{recipe.name}': {what} group_size {spec.group_size} does not divide the input size "
                    f"{fan_in} of layer {name}; pick a divisor (e.g. {_divisor_hint(fan_in, spec.group_size)})")


def _divisor_hint(n: int, g: int) -> int:
    return max(d for d in range(8, min(n, g) + 1) if n % d == 0 and d & (d - 1) == 0) if n >= 8 else n


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


@torch.no_grad()
def run_batches(model: nn.Module, batches: torch.Tensor, batch_size: int, device: torch.device) -> None:
    for i in range(0, len(batches), batch_size):
        model(input_ids=batches[i: i + batch_size].to(device))


def simulate(model: nn.Module, recipe: Recipe, ctx: QuantContext, calib: torch.Tensor) -> nn.Module:
    """Swap every target linear for a QuantLinear; calibrate static activation ranges."""
    qlinears = []
    for name, mod in target_linears(model, recipe):
        wspec = None if name in ctx.prequantized else recipe.weights
        q = QuantLinear(mod, wspec, recipe.activations, name)
        _replace(model, name, q)
        qlinears.append(q)
    if recipe.activations is not None and not recipe.activations.dynamic:
        for q in qlinears:
            q.calibrating = True
        run_batches(model, calib, ctx.batch_size, ctx.device)
    for q in qlinears:
        q.freeze()
    return model


def apply_recipe(model: nn.Module, recipe: Recipe, calib: torch.Tensor, device: torch.device,
                 batch_size: int = 4) -> tuple[nn.Module, QuantContext]:
    """model -> quantized model (in place). calib: [N, T] calibration token ids."""
    check_recipe(model, recipe)
    try:
        arch = arch_of(model)
    except QuantbenchError:
        arch = None  # plain quantization needs no architecture knowledge; mitigations will ask
    ctx = QuantContext(recipe=recipe, arch=arch, device=device, batch_size=batch_size)
    for m in recipe.mitigations:
        mod = mitigations.get_mitigation(m.name)
        stats = mod.calibrate(model, calib, m.options, ctx)
        model = mod.apply(model, stats, m.options, ctx)
    if recipe.backend != "simulated":
        return backends.get_backend(recipe.backend)(model, recipe, ctx), ctx
    if recipe.weights is None and recipe.activations is None:
        return model, ctx
    return simulate(model, recipe, ctx, calib), ctx
