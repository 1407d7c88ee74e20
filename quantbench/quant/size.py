"""Estimated deployable size: quantized linear weights at the recipe's bits per weight
(scales included), every other tensor (embeddings, norms, biases, excluded layers) at 16 bits."""
from __future__ import annotations

import torch.nn as nn

from .apply import target_linears
from .spec import Recipe


def estimate_size(model: nn.Module, recipe: Recipe) -> tuple[int, float]:
    """(bytes, bits per parameter) of the FP model `model` once `recipe` is applied."""
    qweights = {id(m.weight) for _, m in target_linears(model, recipe)} if recipe.weights else set()
    bits_q = recipe.weight_bits()
    total_bits, n = 0.0, 0
    for p in model.parameters():  # tied parameters are yielded once
        total_bits += p.numel() * (bits_q if id(p) in qweights else 16.0)
        n += p.numel()
    return int(total_bits / 8), total_bits / max(n, 1)
