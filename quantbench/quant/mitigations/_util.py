"""Shared by the scaling mitigations (SmoothQuant, AWQ): smoothable pairs prev -> targets.

The pairs are the traced architecture's (quantbench.modeling.arch.topology / quantbench.modeling.arch.pairs), each verified
exact on the model: norm -> every matrix reading its output (q/k/v; gate/up; a parallel block's one
norm -> q/k/v and the MLP; an MoE norm -> router, every expert and the shared expert), up -> down
(gated or ReLU MLPs; every expert), v -> o (v rows of a fused qkv projection included). Folding a
per-channel scale s divides prev's output channel c by s_c and multiplies the targets' input
columns carrying channel c by it:
- RMSNorm:         w <- w / s                     Gemma's (1 + w) RMSNorm: (1 + w) <- (1 + w) / s
- LayerNorm:       w <- w / s, b <- b / s         a linear (rows r_c): W[r_c] <- W[r_c] / s, b[r_c] <- b[r_c] / s
Routers among the targets are compensated (their routing is unchanged) but never quantized.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ...modeling.arch import ArchSpec, PairSpec, get_module
from ...modeling.surgery import get_weight, is_linear, scale_in, set_weight


@dataclass
class Pair:
    """prev -> targets in one layer. rows: prev's output rows carrying the n channels (fused
    producers); index: the channel each target input column carries (grouped-query attention)."""

    key: str  # e.g. "layers.3.down:mlp.up_proj"
    kind: str  # qkv | up | down | o
    prev: nn.Module
    targets: list[tuple[str, nn.Module]]
    norm_kind: str | None = None  # prev is a norm of this kind (None: prev is a linear)
    rows: torch.Tensor | None = None  # [n] long
    index: torch.Tensor | None = None  # [target in] long

    @property
    def channels(self) -> int:
        if self.rows is not None:
            return len(self.rows)
        return self.prev.weight.numel() if self.norm_kind else get_weight(self.prev).shape[0]

    def expand(self, s: torch.Tensor) -> torch.Tensor:
        """prev-channel scales [n] -> target-input scales [in]."""
        return s if self.index is None else s[self.index]

    def reduce(self, v: torch.Tensor, how: str = "max") -> torch.Tensor:
        """target-input statistic [in] -> per prev channel [n] (max or mean over the columns carrying it)."""
        if self.index is None:
            return v
        out = torch.zeros(self.channels, dtype=v.dtype)
        return out.scatter_reduce(0, self.index, v, reduce="amax" if how == "max" else "mean", include_self=False)

    def weight_absmax(self) -> torch.Tensor:
        """max over targets and output rows of |W[:, j]|, per target input column j, reduced to prev channels."""
        w = torch.stack([get_weight(m).abs().amax(0) for _, m in self.targets]).amax(0)  # [in]
        return self.reduce(w, "max")

    @torch.no_grad()
    def fold(self, s: torch.Tensor) -> None:
        """prev's output channel c divided by s_c, every target's input columns carrying c multiplied by it
        (a true division, as SmoothQuant's smooth_ln_fcs and llm-awq's scale_ln_fcs / scale_fc_fc:
        multiplying by 1/s rounds twice)."""
        fold_out(self.prev, s, self.norm_kind, self.rows)
        for _, mod in self.targets:
            scale_in(mod, self.expand(s))


@torch.no_grad()
def fold_out(prev: nn.Module, s: torch.Tensor, norm_kind: str | None, rows: torch.Tensor | None = None) -> None:
    """Divide prev's output channels by s (see the module docstring for each kind); rows: a fused
    linear's rows carrying the channels (the others are left alone)."""
    if norm_kind == "rms+1":
        w = prev.weight.data
        w.copy_(((1.0 + w.float()) / s.to(w.device) - 1.0).to(w.dtype))
        return
    if rows is not None:
        full = torch.ones(get_weight(prev).shape[0], dtype=s.dtype)
        full[rows] = s
        s = full
    divide_out(prev, s)


def divide_out(mod: nn.Module, s: torch.Tensor) -> None:
    """Output channel i of mod (a norm's weight [D] or a linear's row) and its bias divided by s[i]."""
    if mod.weight.dim() == 1:
        mod.weight.data.div_(s.to(mod.weight))
    else:
        w = get_weight(mod)  # [out, in]
        set_weight(mod, w / s.to(w)[:, None])
    if getattr(mod, "bias", None) is not None:
        mod.bias.data.div_(s.to(mod.bias))


def find_pairs(model: nn.Module, arch: ArchSpec, kinds: tuple[str, ...] = ("qkv", "up", "down", "o"),
               notes: list[str] | None = None) -> list[Pair]:
    """The traced, verified pairs of every decoder layer, filtered by kind; what is not exact is noted."""
    pairs = []
    layers = get_module(model, arch.layers)
    for i, layer in enumerate(layers):
        topo = arch.layer(i)
        if notes is not None:
            notes += [f"layers.{i}: {n}" for n in topo.notes]
        for ps in topo.pairs_of(kinds):
            p = _pair(model, arch, i, layer, ps)
            if p is None:
                if notes is not None:
                    notes.append(f"layers.{i}.{ps.kind}: skipped (a wrapped module sits between the pair)")
                continue
            pairs.append(p)
    return pairs


def _pair(model: nn.Module, arch: ArchSpec, i: int, layer: nn.Module, ps: PairSpec) -> Pair | None:
    prev = get_module(layer, ps.prev)
    targets = [(arch.layer_path(i, t), get_module(layer, t)) for t in ps.targets]
    prev_is_norm = ps.kind in ("qkv", "up")
    if any(getattr(m, "weight", None) is None or m.weight.dim() != 2 for _, m in targets) or \
            (not prev_is_norm and not is_linear(prev)):
        return None
    return Pair(f"layers.{i}.{ps.kind}:{ps.prev}", ps.kind, prev, targets,
                norm_kind=arch.norm_kind_of(arch.layer_path(i, ps.prev)) if prev_is_norm else None,
                rows=torch.tensor(ps.rows) if ps.rows is not None else None,
                index=torch.tensor(ps.index) if ps.index is not None else None)


def pair_inputs(pairs: list[Pair]) -> dict[str, nn.Module]:
    """One module per pair whose input is the pair's input (the first target), keyed by pair key."""
    return {p.key: p.targets[0][1] for p in pairs}


def with_stats(pairs: list[Pair], stats: dict, notes: list[str] | None = None) -> list[Pair]:
    """Pairs whose input was seen in calibration (an expert no calibration token was routed to is left as is)."""
    kept = [p for p in pairs if p.key in stats]
    if notes is not None:
        notes += [f"{p.key}: no calibration token reached it, left unscaled" for p in pairs if p.key not in stats]
    return kept
