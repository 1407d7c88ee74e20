"""`sigmoid`: sigmoid attention without normalisation (Ramapuram et al. 2024):
w_ij = sigmoid(q_i·k_j/√d − log T_i) for visible keys j ≤ i, 0 otherwise.

T_i is the number of keys query i can see (i + 1), not the context length: this keeps every
token's output independent of how many tokens follow it (so a longer context, a KV cache, or the
evaluation windows all give the same value for the same prefix), and makes the expected total mass
≈ 1 at initialisation for every position. Returned weights are these unnormalised values.
"""
from __future__ import annotations

import torch

from . import VARIANTS
from .base import BaseAttention, causal_mask


@VARIANTS.register("sigmoid")
class SigmoidAttention(BaseAttention):
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        tq, tk = q.shape[-2], k.shape[-2]
        mask = causal_mask(tq, tk, q.device)  # [Tq, Tk]
        visible = mask.sum(-1, keepdim=True).float()  # [Tq, 1] keys each query sees
        w = torch.sigmoid(self.scores(q, k).float() - visible.log()) * mask  # [B, H, Tq, Tk]
        w = w.to(v.dtype)
        return w @ v, w
