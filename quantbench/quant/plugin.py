"""The plugin interfaces, declared in code. Adding a mitigation or a backend is one module that
subclasses one of these and registers itself (see docs/quantization.md, "adding a mitigation").

Mitigation (one module each in quant/mitigations/):
    Options                          typed options (pydantic, unknown keys rejected at config time)
    check(model, plan, opts)         reject a recipe/model before any work (one-line QuantbenchError)
    calibrate(model, ctx, opts)      -> Stats: read-only pass (through ctx.calib, cached and shared)
    apply(model, stats, ctx, opts)   -> Effects: transform the model in place and declare what changed

Backend (one module each in quant/backends/):
    Options, supports(plan) -> None | reason, apply(model, plan, names, effects, ctx, opts) -> model
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict

from ..core.errors import QuantbenchError, UnsupportedArchitecture
from ..modeling.arch import ArchSpec, arch_of
from .calibration import Calibration
from .effects import Effects
from .plan import Plan
from .spec import QuantSpec, Recipe


class Options(BaseModel):
    """Base of every plugin's options: unknown keys are errors, values are typed."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class BackendUnavailable(RuntimeError):
    """The backend cannot run in this environment (missing package, needs CUDA...): the row is skipped."""


@dataclass
class QuantContext:
    """What mitigations and backends may use besides the model."""

    plan: Plan
    calib: Calibration
    arch: ArchSpec | None = None
    upstream: str = "fp"  # names the model state: the mitigations applied so far (calibration cache key)
    effects: Effects = field(default_factory=Effects)  # declared by the mitigations so far
    keep_stored: bool = True  # simulated linears keep their stored form (export); False: dropped once built (a sweep)

    @property
    def recipe(self) -> Recipe:
        return self.plan.recipe

    @property
    def device(self) -> torch.device:
        return self.calib.device

    @property
    def batch_size(self) -> int:
        return self.calib.batch_size


class Mitigation(ABC):
    name: ClassVar[str] = ""
    Options: ClassVar[type[BaseModel]] = Options
    needs: ClassVar[tuple[str, ...]] = ()  # of "weights", "activations", "arch"
    finalizes_weights: ClassVar[bool] = False  # hands over final QTensors (no weight change may follow)
    changes_weights: ClassVar[bool] = True

    @classmethod
    def spec_issue(cls, weights: QuantSpec | None, activations: QuantSpec | None) -> str | None:
        """Why this mitigation cannot work exactly with these specs (checked when the recipe is read), or None."""
        return None

    def check(self, model: nn.Module, plan: Plan, opts: Any) -> None:
        r = plan.recipe
        for what in self.needs:
            if what == "arch":
                try:
                    arch_of(model)
                except UnsupportedArchitecture as e:
                    raise QuantbenchError(f"recipe '{r.name}': {self.name} needs the model's topology: {e}") from None
            elif not any(getattr(lp, what) is not None for lp in plan.linears.values()):
                raise QuantbenchError(f"recipe '{r.name}': {self.name} needs {what} quantization ({what}: ...)")

    def calibrate(self, model: nn.Module, ctx: QuantContext, opts: Any) -> Any:
        return None

    @abstractmethod
    def apply(self, model: nn.Module, stats: Any, ctx: QuantContext, opts: Any) -> Effects:
        """Transform the model in place; return what changed."""


class Backend(ABC):
    name: ClassVar[str] = ""
    Options: ClassVar[type[BaseModel]] = Options
    real: ClassVar[bool] = True  # False: simulated (fake-quant in float)

    def supports(self, plan: Plan, names: list[str]) -> str | None:
        """None when this backend can run the plan's entries `names`, else the reason it cannot."""
        return None

    @abstractmethod
    def apply(self, model: nn.Module, plan: Plan, names: list[str], ctx: QuantContext, opts: Any) -> nn.Module:
        """Quantize the linears `names` of the model as the plan says; return the model."""
