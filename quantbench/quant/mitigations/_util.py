"""Shared by the scaling mitigations (SmoothQuant, AWQ): smoothable pairs prev -> targets.

A pair is an op whose output channels feed every target linear's input channels (norm -> q/k/v,
norm -> gate/up, up -> down, v -> o; a parallel block's one norm -> q/k/v + MLP inputs), so a
per-channel scale can be divided out of prev and multiplied into the targets exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ...arch import ArchSpec, get_module
from ...surgery import get_weight, is_linear, scale_in, set_weight


@dataclass
class Pair:
    """prev -> targets. kv_groups: for v -> o under grouped-query attention, prev has n_kv*hd
    outputs and each target n_heads*hd inputs; target scales are prev scales repeated per query head."""

    key: str  # e.g. "layers.3.down"
    kind: str  # qkv | up | down | o
    prev: nn.Module
    targets: list[tuple[str, nn.Module]]
    rep: int = 1  # query heads per kv head (v -> o only)
    head_dim: int = 0

    def expand(self, s: torch.Tensor) -> torch.Tensor:
        """prev-channel scales [n_kv*hd] -> target-input scales [n_heads*hd]."""
        if self.rep == 1:
            return s
        return s.reshape(-1, 1, self.head_dim).expand(-1, self.rep, -1).reshape(-1)  # [kv, rep, hd] -> flat

    def reduce(self, v: torch.Tensor, how: str = "max") -> torch.Tensor:
        """target-input statistic [n_heads*hd] -> per prev channel [n_kv*hd] (max or mean over the group)."""
        if self.rep == 1:
            return v
        g = v.reshape(-1, self.rep, self.head_dim)  # [kv, rep, hd]
        return (g.amax(1) if how == "max" else g.mean(1)).reshape(-1)

    def weight_absmax(self) -> torch.Tensor:
        """max over targets and output rows of |W[:, j]|, per target input channel j, reduced to prev channels."""
        w = torch.stack([get_weight(m).abs().amax(0) for _, m in self.targets]).amax(0)  # [in]
        return self.reduce(w, "max")

    @torch.no_grad()
    def fold(self, s: torch.Tensor) -> None:
        """prev's output channel j divided by s_j, every target's input column j multiplied by it
        (a true division, as SmoothQuant's smooth_ln_fcs and llm-awq's scale_ln_fcs / scale_fc_fc:
        multiplying by 1/s rounds twice)."""
        divide_out(self.prev, s)
        for _, mod in self.targets:
            scale_in(mod, self.expand(s))


def divide_out(mod: nn.Module, s: torch.Tensor) -> None:
    """Output channel i of mod (a norm's weight [D] or a linear's row) and its bias divided by s[i]."""
    if mod.weight.dim() == 1:
        mod.weight.data.div_(s.to(mod.weight))
    else:
        w = get_weight(mod)  # [out, in]
        set_weight(mod, w / s.to(w)[:, None])
    if getattr(mod, "bias", None) is not None:
        mod.bias.data.div_(s.to(mod.bias))


def _gqa(model: nn.Module) -> tuple[int, int]:
    cfg = model.config
    heads = getattr(cfg, "num_attention_heads", None)
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return heads // kv, hd


def find_pairs(model: nn.Module, arch: ArchSpec, kinds: tuple[str, ...] = ("qkv", "up", "down", "o"),
               notes: list[str] | None = None) -> list[Pair]:
    """The arch's smoothable pairs in every decoder layer, filtered by kind; skipped ones noted."""
    kind_of = {arch.attn_norm: "qkv", arch.mlp_norm: "up", arch.up[-1]: "down", arch.qkv[-1]: "o"}
    rep, hd = _gqa(model)
    pairs = []
    for i, layer in enumerate(get_module(model, arch.layers)):
        for prev_path, tgt_paths in arch.smooth_pairs:
            kind = kind_of[prev_path]
            if kind not in kinds:
                continue
            prev = get_module(layer, prev_path)
            targets = [(f"{arch.layers}.{i}.{p}", get_module(layer, p)) for p in tgt_paths]
            if not all(is_linear(m) for _, m in targets) or (kind in ("down", "o") and not is_linear(prev)):
                if notes is not None:
                    notes.append(f"layers.{i}.{kind}: skipped (a wrapped module sits between the pair)")
                continue
            pairs.append(Pair(f"layers.{i}.{kind}", kind, prev, targets,
                              rep=rep if kind == "o" else 1, head_dim=hd))
    return pairs


def pair_inputs(pairs: list[Pair]) -> dict[str, nn.Module]:
    """One module per pair whose input is the pair's input (the first target), keyed by pair key."""
    return {p.key: p.targets[0][1] for p in pairs}
