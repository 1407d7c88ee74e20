"""Attention variants, one small module each, selected by name (`attention:` in the model config).

Each public module registers its class with `@VARIANTS.register("<name>")`; the registry imports
every public module of this package the first time a variant is looked up.
"""
from __future__ import annotations

from ...core.errors import ConfigError
from ...core.registry import Registry, UnknownName
from .base import BaseAttention

VARIANTS: Registry[type[BaseAttention]] = Registry("attention variant", __name__)


def attention_class(name: str) -> type[BaseAttention]:
    try:
        return VARIANTS.get(name)
    except UnknownName as e:
        raise ConfigError(str(e)) from None


__all__ = ["VARIANTS", "attention_class", "BaseAttention"]
