"""Outlier mitigations: one module each, one small interface.

A mitigation module defines
    calibrate(model, batches, opts, ctx) -> stats      # read-only pass over calibration data
    apply(model, stats, opts, ctx) -> model            # transform (in place is fine), return model
and registers itself in MITIGATIONS with `register`. `ctx` is a QuantContext (arch, recipe, device,
notes for the result row, prequantized, configure hooks for new QuantLinears). Optionally
    check(model, recipe) -> None                        # raise QuantbenchError early (check_recipe calls it)
Modules whose name starts with "_" are helpers, not mitigations.
"""
from __future__ import annotations

from types import ModuleType

MITIGATIONS: dict[str, ModuleType] = {}


def register(name: str, module: ModuleType) -> None:
    MITIGATIONS[name] = module


def get_mitigation(name: str) -> ModuleType:
    _load_builtins()
    return MITIGATIONS[name]


def known() -> list[str]:
    _load_builtins()
    return sorted(MITIGATIONS)


def _load_builtins() -> None:
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
