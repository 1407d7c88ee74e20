"""Real-kernel backends (bitsandbytes, optimum-quanto): `backend(model, recipe, ctx) -> model`.

Each backend module registers a callable in BACKENDS. A backend that cannot run here (e.g. it
needs CUDA) raises BackendUnavailable, and the sweep records the row as skipped with the reason.
"""
from __future__ import annotations

from typing import Callable

BACKENDS: dict[str, Callable] = {}


class BackendUnavailable(RuntimeError):
    """The backend cannot run in this environment (missing package, needs CUDA...)."""


def register(name: str, fn: Callable) -> None:
    BACKENDS[name] = fn


def known() -> list[str]:
    _load_builtins()
    return ["simulated", *sorted(BACKENDS)]


def get_backend(name: str) -> Callable:
    _load_builtins()
    return BACKENDS[name]


def _load_builtins() -> None:
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
