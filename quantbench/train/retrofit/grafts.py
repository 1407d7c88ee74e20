"""Grafted attention for pretrained Llama-family models: `LlamaAttention` (same q/k/v/o projections,
RoPE, grouped-query heads, KV cache and Hugging Face masks) plus one structural change, each with a
step-0 state that keeps the pretrained model's function:

| graft | change | step 0 |
|---|---|---|
| `kv_bias` | a learnable key/value slot per head, visible to every query; its logit is q·k_slot/√d + b_h | k_slot = v_slot = 0, b_h = `sink_logit_init` (very negative): slot mass ≈ e^b/Z, not exactly 0 |
| `ca_scale` | head output × 2·sigmoid(Linear(RMSNorm(x))) | linear zero-initialised: factor exactly 1 |
| `gated` | head output × sigmoid(Linear(x)) (Bondarenko et al. 2023) | weight 0, bias b0 = `gate_bias_init`, o_proj × 1/sigmoid(b0): exact (bit-exact for b0 = 0) |
| `clipped_softmax` | clip((ζ−γ)·softmax + γ, 0, 1) | γ = 0, ζ = 1 (exactly softmax); training ramps γ, ζ to their targets |
| `softmax_plus_one` | exp(s_j) / (1 + Σ exp(s_k)): a fixed zero-logit, zero-value slot | cannot be function-preserving: every head output is scaled by Σe^s/(1+Σe^s) |

The from-scratch variants of `quantbench.train.attention` own their projections, have no grouped-query
heads, no KV cache and no padding masks, so their modules cannot wrap a pretrained layer; the formulas
are the same, and `causal_mask` is shared. `x` is the attention input (the output of
`input_layernorm`), as in the from-scratch variants.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
import torch.nn as nn
from transformers.models.llama.modeling_llama import (
    ALL_ATTENTION_FUNCTIONS,
    LlamaAttention,
    apply_rotary_pos_emb,
    eager_attention_forward,
    repeat_kv,
)
from transformers.utils.deprecation import deprecate_kwarg

from ...core.errors import ConfigError
from ...core.registry import Registry, UnknownName
from ..attention.base import causal_mask

GRAFTS: Registry[type["GraftedAttention"]] = Registry("graft")
_NEG = torch.finfo(torch.float32).min  # a hidden key's additive mask (finite: fully masked padding rows stay finite)


def graft_class(name: str) -> type["GraftedAttention"]:
    try:
        return GRAFTS.get(name)
    except UnknownName as e:
        raise ConfigError(str(e)) from None


def additive_mask(mask: torch.Tensor | None, tq: int, tk: int, device: torch.device) -> torch.Tensor:
    """Hugging Face's attention mask in any of its forms -> additive fp32 [B|1, 1, Tq, Tk] (0 visible).
    None: plain causal (SDPA without padding); bool: True = visible (SDPA); float: additive (eager)."""
    if mask is not None and mask.dtype != torch.bool:
        return mask.float()
    vis = causal_mask(tq, tk, device)[None, None] if mask is None else mask  # [B|1, 1, Tq, Tk]
    return torch.zeros(vis.shape, device=device).masked_fill(~vis, _NEG)


class GraftedAttention(LlamaAttention):
    """`attend` (default: the model's own attention implementation, unchanged) and `modulate` (a
    per-token, per-head factor on the head outputs before `o_proj`) are what a graft overrides."""

    graft: ClassVar[str] = ""

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.num_heads = config.num_attention_heads
        self.last_slot_mass: float | None = None

    def reset_graft_parameters(self) -> None:
        """Set the graft's own parameters and buffers to their step-0 values."""

    def compensate(self) -> None:
        """Graft time only: change pretrained weights so that the step-0 graft keeps the function."""

    @property
    def want_weights(self) -> bool:
        return self.config._attn_implementation == "eager"

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                attention_mask: torch.Tensor | None = None, cache=None, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [B, T, D] (normed layer input) -> (out [B, T, D], weights [B, H, T, Tk] or None)."""
        shape = hidden_states.shape[:-1]
        hs = (*shape, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(hs).transpose(1, 2)  # [B, T, H*hd] -> [B, H, T, hd]
        k = self.k_proj(hidden_states).view(hs).transpose(1, 2)  # [B, Hkv, T, hd]
        v = self.v_proj(hidden_states).view(hs).transpose(1, 2)  # [B, Hkv, T, hd]
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
        o, w = self.attend(q, k, v, attention_mask, **kwargs)  # o [B, T, H, hd]
        o = self.modulate(o, hidden_states)
        return self.o_proj(o.reshape(*shape, -1).contiguous()), w

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, **kwargs):
        """The model's own attention (sdpa / eager ...): -> (o [B, T, H, hd], weights or None)."""
        fn = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        return fn(self, q, k, v, mask, dropout=0.0 if not self.training else self.attention_dropout,
                  scaling=self.scaling, **kwargs)

    def modulate(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return o

    def scores(self, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """q [B, H, Tq, hd], k [B, H, Tk, hd] (repeated) -> masked scaled dot products, fp32 [B, H, Tq, Tk]."""
        s = (q @ k.transpose(-1, -2)).float() * self.scaling
        return s + additive_mask(mask, q.shape[-2], k.shape[-2], q.device)

    def heads(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Grouped-query k/v [B, Hkv, T, hd] -> one per query head [B, H, T, hd]."""
        return repeat_kv(k, self.num_key_value_groups), repeat_kv(v, self.num_key_value_groups)


class _SlotAttention(GraftedAttention, ABC):
    """Softmax over [slot, keys]; the slot's logit and value come from `slot`. Returned weights drop the
    slot column (mass on real tokens; rows sum to 1 − slot mass); `last_slot_mass` keeps its mean."""

    @abstractmethod
    def slot(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (slot logit [B, H, Tq, 1] fp32, slot value [H, 1, hd] or None for a zero value)."""

    def attend(self, q, k, v, mask, **kwargs):
        k, v = self.heads(k, v)
        s0, v0 = self.slot(q)
        w = torch.cat([s0, self.scores(q, k, mask)], dim=-1).softmax(-1)  # [B, H, Tq, 1+Tk]
        o = w[..., 1:].to(v.dtype) @ v  # [B, H, Tq, hd]
        if v0 is not None:
            o = o + w[..., :1].to(v.dtype) * v0.to(v.dtype)
        if self.want_weights:
            self.last_slot_mass = float(w[..., 0].detach().mean())
        return o.transpose(1, 2), (w[..., 1:].to(v.dtype) if self.want_weights else None)


@GRAFTS.register("kv_bias")
class KVSlotAttention(_SlotAttention):
    graft = "kv_bias"

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.k_slot = nn.Parameter(torch.zeros(self.num_heads, self.head_dim))
        self.v_slot = nn.Parameter(torch.zeros(self.num_heads, self.head_dim))
        self.slot_logit = nn.Parameter(torch.zeros(self.num_heads))
        self.reset_graft_parameters()

    def reset_graft_parameters(self) -> None:
        with torch.no_grad():
            self.k_slot.zero_()
            self.v_slot.zero_()
            self.slot_logit.fill_(self.config.sink_logit_init)

    def slot(self, q):
        s0 = (q.float() @ self.k_slot.float()[:, :, None]) * self.scaling  # [B, H, Tq, hd] @ [H, hd, 1]
        return s0 + self.slot_logit.float()[:, None, None], self.v_slot[:, None, :]


@GRAFTS.register("softmax_plus_one")
class SoftmaxPlusOneAttention(_SlotAttention):
    """softmax1 ("attention is off by one"): a fixed slot with logit 0 and value 0, no parameters."""

    graft = "softmax_plus_one"

    def slot(self, q):
        return torch.zeros(*q.shape[:-1], 1, device=q.device), None


@GRAFTS.register("clipped_softmax")
class ClippedSoftmaxAttention(GraftedAttention):
    """clip((ζ−γ)·softmax + γ, 0, 1) × causal mask; (γ, ζ) is a buffer saved with the checkpoint."""

    graft = "clipped_softmax"

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.register_buffer("clip", torch.tensor([0.0, 1.0]))
        self.reset_graft_parameters()

    def reset_graft_parameters(self) -> None:
        self.clip.copy_(torch.tensor([0.0, 1.0]))  # γ = 0, ζ = 1: exactly softmax

    def attend(self, q, k, v, mask, **kwargs):
        k, v = self.heads(k, v)
        s = self.scores(q, k, mask)  # [B, H, Tq, Tk]
        gamma, zeta = self.clip[0], self.clip[1]
        w = ((zeta - gamma) * s.softmax(-1) + gamma).clamp(0.0, 1.0) * (s > _NEG / 2)
        w = w.to(v.dtype)
        return (w @ v).transpose(1, 2), (w if self.want_weights else None)


@GRAFTS.register("ca_scale")
class CAScaleAttention(GraftedAttention):
    graft = "ca_scale"

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.scale_norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.scale_proj = nn.Linear(config.hidden_size, self.num_heads, bias=True)
        self.reset_graft_parameters()

    def reset_graft_parameters(self) -> None:
        with torch.no_grad():
            self.scale_proj.weight.zero_()
            self.scale_proj.bias.zero_()
            self.scale_norm.weight.fill_(1.0)

    def modulate(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        s = 2 * torch.sigmoid(self.scale_proj(self.scale_norm(x)))  # [B, T, H]
        return o * s.unsqueeze(-1).to(o.dtype)  # o [B, T, H, hd]


@GRAFTS.register("gated")
class GatedAttention(GraftedAttention):
    graft = "gated"

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.gate_proj = nn.Linear(config.hidden_size, self.num_heads, bias=True)
        self.reset_graft_parameters()

    def reset_graft_parameters(self) -> None:
        with torch.no_grad():
            self.gate_proj.weight.zero_()
            self.gate_proj.bias.fill_(self.config.gate_bias_init)

    def compensate(self) -> None:
        """o_proj × 1/sigmoid(b0): the constant step-0 gate times o_proj is the pretrained o_proj."""
        with torch.no_grad():
            self.o_proj.weight.mul_(1.0 / torch.sigmoid(torch.tensor(float(self.config.gate_bias_init))).item())

    def modulate(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(self.gate_proj(x))  # [B, T, H]
        return o * g.unsqueeze(-1).to(o.dtype)  # o [B, T, H, hd]
