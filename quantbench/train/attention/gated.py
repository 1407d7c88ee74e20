"""`gated`: gated attention (Bondarenko et al. 2023, "Quantizable Transformers").

A sigmoid gate per token and head, computed from the attention input, multiplies the head output:
o_h ← sigmoid(Linear(x))_h · o_h. Unlike `ca_scale` there is no separate norm and no factor 2
(the gate only attenuates), and the gate starts at 0.5 (zero bias, small random weights).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from transformers import initialization as init

from . import VARIANTS
from .base import BaseAttention


@VARIANTS.register("gated")
class GatedAttention(BaseAttention):
    def __init__(self, config) -> None:
        super().__init__(config)
        self.gate_proj = nn.Linear(config.hidden_size, self.num_heads, bias=True)
        self.reset_variant_parameters()

    def reset_variant_parameters(self) -> None:
        init.normal_(self.gate_proj.weight, std=self.config.initializer_range)
        init.zeros_(self.gate_proj.bias)

    def modulate(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(self.gate_proj(x))  # [B, T, H]
        return o * g.transpose(1, 2).unsqueeze(-1).to(o.dtype)  # [B, T, H] -> [B, H, T, 1]
