"""`ca_scale`: explicit context-aware scaling factor (An et al. 2025).

S_c(x) = 2·sigmoid(Linear(norm(x))), one scalar per token and head, multiplied into each head's
output before `o_proj`. The linear starts at zero, so S_c ≡ 1 at initialisation and the module
computes exactly softmax attention; training can then scale a head down without a sink token.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from transformers import initialization as init

from . import VARIANTS
from .base import BaseAttention


@VARIANTS.register("ca_scale")
class CAScaleAttention(BaseAttention):
    def __init__(self, config) -> None:
        super().__init__(config)
        self.scale_norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.scale_proj = nn.Linear(config.hidden_size, self.num_heads, bias=True)
        self.reset_variant_parameters()

    def reset_variant_parameters(self) -> None:
        """S_c ≡ 1 at initialisation (called again by the model's weight init)."""
        init.zeros_(self.scale_proj.weight)
        init.zeros_(self.scale_proj.bias)
        init.ones_(self.scale_norm.weight)

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, D] -> S_c [B, H, T, 1] in (0, 2)."""
        s = 2 * torch.sigmoid(self.scale_proj(self.scale_norm(x)))  # [B, T, H]
        return s.transpose(1, 2).unsqueeze(-1)  # [B, T, H] -> [B, H, T, 1]

    def modulate(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return o * self.scale(x).to(o.dtype)
