"""`softmax`: the baseline. Standard causal softmax attention (Llama-style, RoPE, no biases)."""
from __future__ import annotations

from . import VARIANTS
from .base import BaseAttention


@VARIANTS.register("softmax")
class SoftmaxAttention(BaseAttention):
    """softmax(QKᵀ/√d) V. Every row must sum to 1, so a head that should output "nothing" has to park its
    mass somewhere: this is where attention sinks and the systematic outliers come from."""
