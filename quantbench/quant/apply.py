"""Apply a Recipe to a model, in one direction:

    prepare(model, recipe)            -> Plan      resolve the per-linear plan; reject impossible settings
    mitigate(model, plan, ctx)        -> Effects   each mitigation: calibrate (cached) then apply
    quantize(model, plan, ctx)        -> model     each backend turns its share of the plan into modules
    measure_size(model, plan, ...)    -> Size      on the model as applied (quant/size.py)

`apply_recipe` runs all of it; the pipeline calls the stages itself to measure between them.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..core.errors import QuantbenchError
from ..modeling import prequant
from ..modeling.arch import arch_or_none
from ..modeling.moe import check_experts
from ..modeling.surgery import model_device
from .calibration import Calibration
from .effects import Effects
from .plan import Plan, check_plan, resolve_plan
from .plugin import QuantContext
from .size import Size, measure_size
from .spec import BACKENDS, MITIGATIONS, Recipe


def _options(plugin_cls, options: dict):
    return plugin_cls.Options.model_validate(options)


def prepare(model: nn.Module, recipe: Recipe) -> Plan:
    """The recipe's plan for this model; raises a one-line QuantbenchError before any work when a
    mitigation, a backend or the plan cannot serve this model."""
    prequant.check_recipe(model, recipe)  # an already-quantized checkpoint is not quantized again
    check_experts(model, recipe)  # MoE experts become one linear each, or the recipe is refused
    plan = resolve_plan(model, recipe)
    check_plan(model, plan)
    finalized_by = None
    for m in recipe.mitigations:
        cls = MITIGATIONS.get(m.name, f"recipe '{recipe.name}'")
        if finalized_by and cls.changes_weights:
            raise QuantbenchError(f"recipe '{recipe.name}': {m.name} changes weights after {finalized_by} "
                                  f"has finalized them; put {finalized_by} last")
        cls().check(model, plan, _options(cls, m.options))
        finalized_by = m.name if cls.finalizes_weights else finalized_by
    for backend, names in plan.backends().items():
        reason = BACKENDS.get(backend, f"recipe '{recipe.name}'")().supports(plan, names)
        if reason:
            raise QuantbenchError(f"recipe '{recipe.name}': backend {backend} cannot run this plan: {reason}")
    return plan


def mitigate(model: nn.Module, ctx: QuantContext) -> Effects:
    """Run the recipe's mitigations in order; their Effects accumulate in ctx.effects."""
    for m in ctx.recipe.mitigations:
        t0 = time.perf_counter()
        cls = MITIGATIONS.get(m.name)
        mit, opts = cls(), _options(cls, m.options)
        stats = mit.calibrate(model, ctx, opts)
        eff = mit.apply(model, stats, ctx, opts)
        eff.notes[f"{m.name}_s"] = round(time.perf_counter() - t0, 2)
        ctx.effects.merge(eff)
        ctx.upstream += "|" + json.dumps(m.model_dump(mode="json"), sort_keys=True)
    return ctx.effects


def quantize(model: nn.Module, ctx: QuantContext) -> nn.Module:
    """Every backend of the plan quantizes its linears (simulated is one backend among them)."""
    plan = ctx.plan
    for backend, names in plan.backends().items():
        cls = BACKENDS.get(backend)
        opts = _options(cls, plan.recipe.backend_options if backend == plan.recipe.backend else {})
        model = cls().apply(model, plan, names, ctx, opts)
    return model


@dataclass
class Applied:
    """What applying a recipe produced besides the model: its plan, declared effects, measured size."""

    plan: Plan
    effects: Effects
    size: Size
    notes: dict = field(default_factory=dict)

    @property
    def mode(self) -> str:
        return self.plan.mode


def apply_recipe(model: nn.Module, recipe: Recipe, calib: torch.Tensor | Calibration,
                 device: torch.device | None = None, batch_size: int = 4) -> tuple[nn.Module, Applied]:
    """model -> quantized model (in place) and what was done. calib: [N, T] token ids or a Calibration
    (whose cache is then shared with other recipes)."""
    n_params = sum(p.numel() for p in model.parameters())
    plan = prepare(model, recipe)
    if not isinstance(calib, Calibration):
        calib = Calibration(calib, batch_size, device or model_device(model))
    ctx = QuantContext(plan=plan, calib=calib, arch=arch_or_none(model))
    mitigate(model, ctx)
    model = quantize(model, ctx)
    size = measure_size(model, plan, ctx.effects, n_params)
    return model, Applied(plan, ctx.effects, size, dict(ctx.effects.notes))
