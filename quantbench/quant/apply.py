"""Apply a Recipe to a model: check it, run its mitigations in order, then quantize."""
from __future__ import annotations

import fnmatch
import time
from dataclasses import dataclass, field
from typing import Callable

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
    # run by `simulate` on every new QuantLinear: (name, qlinear) -> None (e.g. int8_decomp's kept channels)
    configure: list[Callable[[str, QuantLinear], None]] = field(default_factory=list)
    census_after: bool = True  # census of the mitigated FP model (before quantization) into notes
    calib: torch.Tensor | None = None  # [N, T] calibration token ids (backends calibrate static ranges on it)


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
    for m in recipe.mitigations:  # a mitigation may reject a recipe/model early (e.g. gptq without weights)
        check = getattr(mitigations.get_mitigation(m.name), "check", None)
        if check is not None:
            check(model, recipe)
    if recipe.backend not in backends.known():
        raise QuantbenchError(f"recipe '{recipe.name}': unknown backend '{recipe.backend}' (known: {', '.join(backends.known())})")
    if recipe.kv is not None:
        _check_kv(model, recipe)
    for spec, what in ((recipe.weights, "weights"), (recipe.activations, "activations")):
        if spec is None or spec.granularity != "group":
            continue
        for name, mod in target_linears(model, recipe):
            fan_in = mod.weight.shape[0] if type(mod).__name__ == "Conv1D" else mod.in_features
            if fan_in % spec.group_size:
                raise QuantbenchError(
                    f"recipe '{recipe.name}': {what} group_size {spec.group_size} does not divide the input size "
                    f"{fan_in} of layer {name}; pick a divisor (e.g. {_divisor_hint(fan_in, spec.group_size)})")


def _check_kv(model: nn.Module, recipe: Recipe) -> None:
    if recipe.backend != "simulated":
        raise QuantbenchError(f"recipe '{recipe.name}': kv quantization is simulated only (backend '{recipe.backend}')")
    try:
        arch = arch_of(model)
    except QuantbenchError as e:
        raise QuantbenchError(f"recipe '{recipe.name}': kv quantization needs architecture knowledge: {e}") from None
    if arch.fused_qkv:
        raise QuantbenchError(f"recipe '{recipe.name}': kv quantization needs separate k/v projections; "
                              f"{model.config.model_type} fuses q/k/v")
    kv = recipe.kv
    if kv.granularity == "group":
        k = model.get_submodule(f"{arch.layers}.0.{arch.qkv[1]}")
        if k.weight.shape[0] % kv.group_size:
            raise QuantbenchError(f"recipe '{recipe.name}': kv group_size {kv.group_size} does not divide the "
                                  f"k/v width {k.weight.shape[0]} (use the head dimension)")


def kv_linears(model: nn.Module, arch: ArchSpec) -> list[str]:
    """Names of every layer's k and v projections (their outputs are what the KV cache stores)."""
    n = len(model.get_submodule(arch.layers))
    return [f"{arch.layers}.{i}.{p}" for i in range(n) for p in arch.qkv[1:3]]


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
    targets = target_linears(model, recipe) if recipe.weights or recipe.activations else []
    for name, mod in targets:
        wspec = None if name in ctx.prequantized else recipe.weights
        q = QuantLinear(mod, wspec, recipe.activations, name)
        _replace(model, name, q)
        for fn in ctx.configure:
            fn(name, q)
        qlinears.append(q)
    if recipe.kv is not None:
        _wrap_kv(model, recipe, ctx)
    if recipe.activations is not None and not recipe.activations.dynamic:
        for q in qlinears:
            q.calibrating = True
        run_batches(model, calib, ctx.batch_size, ctx.device)
    for q in qlinears:
        q.freeze()
    return model


def _wrap_kv(model: nn.Module, recipe: Recipe, ctx: QuantContext) -> None:
    """KV cache: fake-quantize the k/v projection outputs (keys before RoPE, as in KVQuant's pre-RoPE keys)."""
    for name in kv_linears(model, ctx.arch):
        mod = model.get_submodule(name)
        if not isinstance(mod, QuantLinear):
            mod = QuantLinear(mod, None, None, name)
            _replace(model, name, mod)
        mod.ospec = recipe.kv


def _census_note(model: nn.Module, calib: torch.Tensor, ctx: QuantContext, key: str) -> None:
    """Outlier measurements of the FP model before / after the mitigations (key), into the row:
    census_max_abs / census_max_ratio: the census' largest residual |x| and its ratio to the median;
    max_input_ratio: the largest max|x| / median|x| over the inputs the quantizers will actually see
    (target linears, inside any rotation wrapper). 2 x 128 calibration tokens: this runs per recipe."""
    from ..census import run_census
    from ..config import CensusConfig

    if ctx.arch is None:
        return
    t0 = time.perf_counter()
    ids = calib[:2, :128]
    cache_key = (hash(ids.numpy().tobytes()), float(next(model.parameters()).detach().double().sum()))
    if key == "before" and cache_key in _CENSUS_BEFORE:
        s = _CENSUS_BEFORE[cache_key]
    else:
        cfg = CensusConfig(top_k=1, plots=False, linear_inputs=False)
        s = dict(run_census(model, ids, None, cfg, batch_size=ctx.batch_size)["summary"])
        s["max_input_ratio"] = _max_input_ratio(model, ids, ctx)
        if key == "before":
            _CENSUS_BEFORE.clear()
            _CENSUS_BEFORE[cache_key] = s
    ctx.notes[f"census_max_abs_{key}"] = round(s["max_abs"], 2)
    ctx.notes[f"census_max_ratio_{key}"] = round(s["max_ratio"], 1)
    ctx.notes[f"max_input_ratio_{key}"] = round(s["max_input_ratio"], 1)
    ctx.notes["census_s"] = round(ctx.notes.get("census_s", 0.0) + time.perf_counter() - t0, 2)


@torch.no_grad()
def _max_input_ratio(model: nn.Module, ids: torch.Tensor, ctx: QuantContext) -> float:
    from .mitigations._util import input_hooks

    best = [0.0]

    def fn(_name: str, x: torch.Tensor) -> None:  # x [N, D]
        a = x.abs()
        best[0] = max(best[0], float(a.max() / a.median().clamp_min(1e-12)))

    with input_hooks(dict(target_linears(model, ctx.recipe)), fn):
        run_batches(model, ids, ctx.batch_size, ctx.device)
    return best[0]


_CENSUS_BEFORE: dict[tuple, dict] = {}  # the FP model's census is the same for every recipe of a run


def apply_recipe(model: nn.Module, recipe: Recipe, calib: torch.Tensor, device: torch.device,
                 batch_size: int = 4, census_after: bool = True) -> tuple[nn.Module, QuantContext]:
    """model -> quantized model (in place). calib: [N, T] calibration token ids."""
    check_recipe(model, recipe)
    try:
        arch = arch_of(model)
    except QuantbenchError:
        arch = None  # plain quantization needs no architecture knowledge; mitigations will ask
    ctx = QuantContext(recipe=recipe, arch=arch, device=device, batch_size=batch_size, census_after=census_after,
                       calib=calib)
    if recipe.mitigations and ctx.census_after:
        _census_note(model, calib, ctx, "before")
    for m in recipe.mitigations:
        t0 = time.perf_counter()
        mod = mitigations.get_mitigation(m.name)
        stats = mod.calibrate(model, calib, m.options, ctx)
        model = mod.apply(model, stats, m.options, ctx)
        ctx.notes[f"{m.name}_s"] = round(time.perf_counter() - t0, 2)
    if recipe.mitigations and ctx.census_after:
        _census_note(model, calib, ctx, "after")
    if recipe.backend != "simulated":
        return backends.get_backend(recipe.backend)(model, recipe, ctx), ctx
    if recipe.weights is None and recipe.activations is None and recipe.kv is None:
        return model, ctx
    return simulate(model, recipe, ctx, calib), ctx
