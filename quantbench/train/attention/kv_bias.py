"""`kv_bias`: a learnable key and value per head, prepended to every sequence and visible to every
query (an explicit, content-free attention sink; Sun et al. 2024, An et al. 2025).

Returned weights: the bias column is dropped, so `weights[..., j]` is the mass on real token j and
rows sum to 1 − (mass on the bias slot). The census's "first-token mass" is therefore the mass on
the first *real* token (BOS), not on the bias slot; `last_bias_mass` keeps the mean bias-slot mass of
the last eager forward for reports.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import initialization as init

from . import VARIANTS
from .base import BaseAttention, causal_mask


@VARIANTS.register("kv_bias")
class KVBiasAttention(BaseAttention):
    def __init__(self, config) -> None:
        super().__init__(config)
        self.k_bias = nn.Parameter(torch.randn(self.num_heads, 1, self.head_dim) * config.initializer_range)
        self.v_bias = nn.Parameter(torch.zeros(self.num_heads, 1, self.head_dim))
        self.last_bias_mass: float | None = None
        self.reset_variant_parameters()

    def reset_variant_parameters(self) -> None:
        init.normal_(self.k_bias, std=self.config.initializer_range)
        init.zeros_(self.v_bias)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, _, t, _ = q.shape
        kb = self.k_bias.to(k.dtype).expand(b, -1, -1, -1)  # [B, H, 1, hd]
        vb = self.v_bias.to(v.dtype).expand(b, -1, -1, -1)  # [B, H, 1, hd]
        k, v = torch.cat([kb, k], dim=2), torch.cat([vb, v], dim=2)  # [B, H, 1+T, hd]
        mask = causal_mask(t, t + 1, q.device)  # [T, 1+T]: the bias slot (column 0) is always visible
        if not self.want_weights:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask), None
        s = self.scores(q, k).float().masked_fill(~mask, float("-inf"))
        w = s.softmax(-1).to(v.dtype)  # [B, H, T, 1+T]
        self.last_bias_mass = float(w[..., 0].detach().float().mean())
        return w @ v, w[..., 1:]
