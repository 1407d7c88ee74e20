"""One registry type for every kind of plugin (mitigations, backends, recipe presets, attention
variants): register by name, look up with a "did you mean ..." on a typo, discover built-ins by
importing every public module of a package once."""
from __future__ import annotations

import difflib
import importlib
import pkgutil
from typing import Generic, Iterator, TypeVar

from .errors import QuantbenchError

T = TypeVar("T")


class UnknownName(QuantbenchError, ValueError):
    """A plugin name that is not registered (a ValueError too, so pydantic reports where it was)."""


def suggest(name: str, known: list[str]) -> str:
    """' (did you mean 'x'?)' for the closest known name, or '' when none is close."""
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


class Registry(Generic[T]):
    """name -> plugin. `package`: dotted name whose public modules register built-ins on import."""

    def __init__(self, kind: str, package: str | None = None):
        self.kind = kind
        self._package = package
        self._items: dict[str, T] = {}
        self._loaded = package is None

    def register(self, name: str, item: T | None = None):
        """registry.register("x", obj), or as a class decorator: @registry.register("x")."""
        if item is not None:
            self._items[name] = item
            return item

        def deco(obj: T) -> T:
            self._items[name] = obj
            return obj
        return deco

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        pkg = importlib.import_module(self._package)
        for info in pkgutil.iter_modules(pkg.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{self._package}.{info.name}")

    def names(self) -> list[str]:
        self._load()
        return list(self._items)

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def values(self) -> list[T]:
        self._load()
        return list(self._items.values())

    def items(self):
        self._load()
        return self._items.items()

    def get(self, name: str, where: str = "") -> T:
        """The plugin, or a one-line QuantbenchError naming the known ones and the closest match."""
        self._load()
        if name not in self._items:
            known = sorted(self._items)
            prefix = f"{where}: " if where else ""
            raise UnknownName(f"{prefix}unknown {self.kind} '{name}'{suggest(name, known)} "
                                  f"(known: {', '.join(known)})")
        return self._items[name]
