"""`clipped_softmax`: clip((ζ − γ)·softmax(QKᵀ/√d) + γ, 0, 1) (Bondarenko et al. 2023).

With γ < 0 a probability can become exactly 0 without an infinitely large logit gap, so a head can
output (nearly) nothing without building an outlier. γ = `clip_gamma`, ζ = `clip_zeta` in the model
config. The result is multiplied by the causal mask again (a positive γ would otherwise let a query
see future keys). Returned weights are the clipped probabilities (rows need not sum to 1).
"""
from __future__ import annotations

import torch

from . import VARIANTS
from .base import BaseAttention, causal_mask


@VARIANTS.register("clipped_softmax")
class ClippedSoftmaxAttention(BaseAttention):
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        gamma, zeta = self.config.clip_gamma, self.config.clip_zeta
        mask = causal_mask(q.shape[-2], k.shape[-2], q.device)  # [Tq, Tk]
        p = self.scores(q, k).float().masked_fill(~mask, float("-inf")).softmax(-1)  # [B, H, Tq, Tk]
        w = ((zeta - gamma) * p + gamma).clamp(0.0, 1.0) * mask
        w = w.to(v.dtype)
        return w @ v, w
