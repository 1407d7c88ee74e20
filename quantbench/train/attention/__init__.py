"""Attention variants, one small module each, selected by name (`attention:` in the model config)."""
from __future__ import annotations

from ...errors import ConfigError
from .base import BaseAttention
from .ca_scale import CAScaleAttention
from .clipped_softmax import ClippedSoftmaxAttention
from .gated import GatedAttention
from .kv_bias import KVBiasAttention
from .sigmoid import SigmoidAttention
from .softmax import SoftmaxAttention

VARIANTS: dict[str, type[BaseAttention]] = {
    "softmax": SoftmaxAttention,
    "ca_scale": CAScaleAttention,
    "kv_bias": KVBiasAttention,
    "gated": GatedAttention,
    "clipped_softmax": ClippedSoftmaxAttention,
    "sigmoid": SigmoidAttention,
}


def attention_class(name: str) -> type[BaseAttention]:
    if name not in VARIANTS:
        raise ConfigError(f"unknown attention variant '{name}' (known: {', '.join(VARIANTS)})")
    return VARIANTS[name]


__all__ = ["VARIANTS", "attention_class", "BaseAttention"]
