"""Shared attention machinery: q/k/v/o projections (Llama names), rotary positions, causal masks.

Every variant is a subclass that overrides `attend` (how queries read values) and optionally
`modulate` (a per-token, per-head factor applied to the head outputs before `o_proj`).
`forward` returns `(output, weights)`: `weights` is `[B, H, Tq, Tk]` when the model's
`config._attn_implementation == "eager"` (the census switches to eager to collect them), else None.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_tables(seq_len: int, head_dim: int, theta: float, device: torch.device,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables [T, head_dim] (Llama's half-split rotary layout)."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    ang = torch.arange(seq_len, device=device, dtype=torch.float32)[:, None] * inv[None, :]  # [T, hd/2]
    emb = torch.cat((ang, ang), dim=-1)  # [T, hd]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, hd]; cos/sin [T, hd]."""
    return x * cos + rotate_half(x) * sin


def causal_mask(tq: int, tk: int, device: torch.device) -> torch.Tensor:
    """Boolean [Tq, Tk], True where query i may see key j (j <= i + Tk - Tq)."""
    return torch.ones(tq, tk, dtype=torch.bool, device=device).tril(diagonal=tk - tq)


class BaseAttention(nn.Module):
    """Multi-head causal self-attention with RoPE; subclasses change how probabilities are formed."""

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        d, h = config.hidden_size, config.num_attention_heads
        self.num_heads, self.head_dim = h, d // h
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    @property
    def want_weights(self) -> bool:
        return getattr(self.config, "_attn_implementation", None) == "eager"

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # [B, T, D] -> [B, H, T, hd]

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [B, T, D] (the normed layer input) -> (out [B, T, D], weights [B, H, T, Tk] or None)."""
        b, t, d = x.shape
        q = apply_rope(self.split_heads(self.q_proj(x)), cos, sin)  # [B, H, T, hd]
        k = apply_rope(self.split_heads(self.k_proj(x)), cos, sin)  # [B, H, T, hd]
        v = self.split_heads(self.v_proj(x))  # [B, H, T, hd]
        o, w = self.attend(q, k, v)  # [B, H, T, hd]
        o = self.modulate(o, x)
        o = o.transpose(1, 2).reshape(b, t, d)  # [B, H, T, hd] -> [B, T, D]
        return self.o_proj(o), (w if self.want_weights else None)

    def scores(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Scaled dot products [B, H, Tq, Tk]."""
        return q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Plain causal softmax attention; SDPA unless the weights are wanted."""
        if not self.want_weights:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True), None
        s = self.scores(q, k).float()
        s = s.masked_fill(~causal_mask(q.shape[-2], k.shape[-2], q.device), float("-inf"))
        w = s.softmax(-1).to(v.dtype)  # [B, H, Tq, Tk]
        return w @ v, w

    def modulate(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Per-token, per-head factor on the head outputs o [B, H, T, hd]; identity here."""
        return o
