"""Mixture-of-experts blocks with one nn.Linear per expert, so every expert is planned, quantized,
calibrated (GPTQ Hessians, AWQ/SmoothQuant statistics) and profiled like any other linear layer.

transformers 5 stores a block's experts as fused 3-D tensors (`gate_up_proj` [E, 2I, D] and
`down_proj` [E, D, I] in MixtralExperts, Qwen2MoeExperts, Qwen3MoeExperts, ...), which no linear-
layer tool sees. `unfuse_experts` replaces such a module, in place, by an `ExpertList` computing the
same function (same routing, same per-expert order of the weighted sum): expert e becomes
`experts.<e>.{gate_proj, up_proj, down_proj}`. A fused experts module of another layout is left as
it is and named by `fused_expert_modules`, so the topology can say it cannot map it.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class ExpertMLP(nn.Module):
    """One expert: down(act(gate(x)) * up(x)). `token_idx` (the flat token index of each row) is kept
    as `tokens` during the call, so hooks on the expert's linears can see which tokens it serves."""

    def __init__(self, gate: nn.Linear, up: nn.Linear, down: nn.Linear, act: nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = gate, up, down, act
        self.tokens: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, token_idx: torch.Tensor | None = None) -> torch.Tensor:
        self.tokens = token_idx  # the census maps each row of the expert's inputs back to its token
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class ExpertList(nn.ModuleList):
    """Drop-in for transformers' fused experts: forward(hidden [N, D], top_k_index [N, k],
    top_k_weights [N, k]) -> [N, D], the routing-weighted sum of the selected experts' outputs."""

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        sel = top_k_index.T  # [k, N]: same (slot, token) order as the fused implementation
        for e, expert in enumerate(self):
            slot, token_idx = torch.where(sel == e)
            if token_idx.numel() == 0:
                continue
            y = expert(hidden_states[token_idx], token_idx) * top_k_weights[token_idx, slot, None]  # [n, D]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out


def _is_fused(mod: nn.Module) -> bool:
    """An experts module (by its class name) that still holds 3-D weight tensors."""
    return "expert" in type(mod).__name__.lower() and \
        any(isinstance(p, nn.Parameter) and p.dim() == 3 for p in mod.parameters(recurse=False))


def _unfusable(mod: nn.Module) -> bool:
    """transformers 5's layout: gate_up_proj [E, 2I, D], down_proj [E, D, I], act_fn, no biases."""
    gu, dn = getattr(mod, "gate_up_proj", None), getattr(mod, "down_proj", None)
    own = dict(mod.named_parameters(recurse=False))
    return (isinstance(gu, nn.Parameter) and isinstance(dn, nn.Parameter) and gu.dim() == 3 and dn.dim() == 3
            and set(own) == {"gate_up_proj", "down_proj"} and hasattr(mod, "act_fn")
            and gu.shape[0] == dn.shape[0] and gu.shape[1] == 2 * dn.shape[2] and gu.shape[2] == dn.shape[1])


@torch.no_grad()
def _expert_list(mod: nn.Module) -> ExpertList:
    gu, dn = mod.gate_up_proj, mod.down_proj  # [E, 2I, D], [E, D, I]
    n_exp, two_i, d = gu.shape
    i = two_i // 2
    experts = []
    for e in range(n_exp):
        lin = [nn.Linear(d, i, bias=False, device=gu.device, dtype=gu.dtype) for _ in range(2)]
        down = nn.Linear(i, d, bias=False, device=dn.device, dtype=dn.dtype)
        lin[0].weight.copy_(gu[e, :i])  # gate rows first: fused forward chunks (gate, up)
        lin[1].weight.copy_(gu[e, i:])
        down.weight.copy_(dn[e])
        experts.append(ExpertMLP(lin[0], lin[1], down, mod.act_fn))
    return ExpertList(experts)


def unfuse_experts(model: nn.Module) -> int:
    """Replace every fused experts module of transformers' layout by an ExpertList (function
    unchanged); returns how many were replaced. Idempotent."""
    todo = [(n, m) for n, m in model.named_modules() if _unfusable(m)]
    for name, mod in todo:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, _expert_list(mod))
    return len(todo)


def fused_expert_modules(model: nn.Module) -> list[str]:
    """Modules still holding 3-D expert tensors (a layout unfuse_experts does not know)."""
    return [n for n, m in model.named_modules() if _is_fused(m)]


def expert_lists(model: nn.Module) -> dict[str, ExpertList]:
    return {n: m for n, m in model.named_modules() if isinstance(m, ExpertList)}
