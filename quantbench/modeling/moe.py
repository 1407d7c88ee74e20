"""Mixture-of-experts blocks with one nn.Linear per expert, so every expert is planned, quantized,
calibrated (GPTQ Hessians, AWQ/SmoothQuant statistics) and profiled like any other linear layer.

transformers 5 stores a block's experts as fused 3-D tensors (`gate_up_proj` [E, 2I, D] and
`down_proj` [E, D, I] in MixtralExperts, Qwen2MoeExperts, Qwen3MoeExperts, DeepseekV3 ...; GPT-OSS
transposed, interleaved and with biases), which no linear-layer tool sees. `unfuse_experts` replaces
such a module, in place, by an `ExpertList` computing the same function (same routing, same
per-expert order of the weighted sum): expert e becomes `experts.<e>.{gate_proj, up_proj, down_proj}`.
A fused experts module of another layout is left as it is and named by `fused_expert_modules`: the
topology says it cannot map it and recipes that quantize are refused (the experts would stay FP).
"""
from __future__ import annotations

import re

import torch
import torch.nn as nn


class ActTimesUp(nn.Module):
    """act(gate) * up (SwiGLU / GeGLU experts)."""

    def __init__(self, act: nn.Module):
        super().__init__()
        self.act_fn = act

    def forward(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return self.act_fn(gate) * up


class InterleavedGate(nn.Module):
    """GPT-OSS: the original module's own gate function on [gate, up] interleaved as it stores them."""

    def __init__(self, fused: nn.Module):
        super().__init__()
        self.alpha, self.limit, self._gate_fn = fused.alpha, fused.limit, type(fused)._apply_gate

    def forward(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return self._gate_fn(self, torch.stack([gate, up], -1).flatten(-2))  # [n, I, 2] -> [n, 2I] (g0, u0, g1, ...)


class ExpertMLP(nn.Module):
    """One expert: down(combine(gate(x), up(x))). `token_idx` (the flat token index of each row) is kept
    as `tokens` during the call, so hooks on the expert's linears can see which tokens it serves."""

    def __init__(self, gate: nn.Linear, up: nn.Linear, down: nn.Linear, combine: nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj, self.combine = gate, up, down, combine
        self.tokens: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, token_idx: torch.Tensor | None = None) -> torch.Tensor:
        self.tokens = token_idx  # the census maps each row of the expert's inputs back to its token
        return self.down_proj(self.combine(self.gate_proj(x), self.up_proj(x)))


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


def _layout(mod: nn.Module) -> str | None:
    """'chunked': transformers 5's gate_up_proj [E, 2I, D] (gate rows, then up rows), down_proj [E, D, I],
    act_fn, no biases (Mixtral, Qwen2/3-MoE, DeepSeek-V3, OLMoE, ...); 'interleaved': GPT-OSS's
    gate_up_proj [E, D, 2I] (gate, up alternating) and down_proj [E, I, D] with biases; else None."""
    own = dict(mod.named_parameters(recurse=False))
    gu, dn = own.get("gate_up_proj"), own.get("down_proj")
    if gu is None or dn is None or gu.dim() != 3 or dn.dim() != 3 or gu.shape[0] != dn.shape[0]:
        return None
    if set(own) == {"gate_up_proj", "down_proj"} and hasattr(mod, "act_fn") and \
            gu.shape[1] == 2 * dn.shape[2] and gu.shape[2] == dn.shape[1]:
        return "chunked"
    if set(own) == {"gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"} and \
            hasattr(type(mod), "_apply_gate") and gu.shape[2] == 2 * dn.shape[1] and gu.shape[1] == dn.shape[2]:
        return "interleaved"
    return None


def _unfusable(mod: nn.Module) -> bool:
    return _layout(mod) is not None


def _linear(w: torch.Tensor, b: torch.Tensor | None) -> nn.Linear:
    """nn.Linear with weight w [out, in] (and bias b [out])."""
    lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
    lin.weight.copy_(w)
    if b is not None:
        lin.bias.copy_(b)
    return lin


@torch.no_grad()
def _expert_list(mod: nn.Module) -> ExpertList:
    gu, dn = mod.gate_up_proj, mod.down_proj
    experts = []
    for e in range(gu.shape[0]):
        if _layout(mod) == "chunked":  # [E, 2I, D], [E, D, I]: forward chunks (gate, up)
            i = gu.shape[1] // 2
            gate, up, down = _linear(gu[e, :i], None), _linear(gu[e, i:], None), _linear(dn[e], None)
            combine: nn.Module = ActTimesUp(mod.act_fn)
        else:  # [E, D, 2I] with x @ W, gate/up interleaved; [E, I, D]
            gb, db = mod.gate_up_proj_bias, mod.down_proj_bias
            gate, up = _linear(gu[e][:, ::2].T, gb[e, ::2]), _linear(gu[e][:, 1::2].T, gb[e, 1::2])
            down, combine = _linear(dn[e].T, db[e]), InterleavedGate(mod)
        experts.append(ExpertMLP(gate, up, down, combine))
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


def borrow_static_ranges(qlinears: dict[str, nn.Module]) -> list[str]:
    """Static activation ranges for experts no calibration token was routed to: the union of the ranges
    observed at the same linear of the other experts of that block (gate/up read rows of the same
    normed input; for down it is the closest available estimate). Returns the names filled in."""
    key = lambda n: re.sub(r"\bexperts\.\d+\.", "experts.*.", n)  # noqa: E731
    groups: dict[str, list[nn.Module]] = {}
    for name, q in qlinears.items():
        groups.setdefault(key(name), []).append(q)
    filled = []
    for name, q in qlinears.items():
        seen = [s for s in groups[key(name)] if s.a_lo is not None]
        if q.a_lo is None and key(name) != name and seen:
            q.a_lo = torch.stack([s.a_lo for s in seen]).amin(0)
            q.a_hi = torch.stack([s.a_hi for s in seen]).amax(0)
            filled.append(name)
    return filled


def check_experts(model: nn.Module, recipe) -> None:
    """A recipe that quantizes must not silently skip experts it cannot see as linear layers."""
    from ..core.errors import QuantbenchError

    if recipe.is_fp:
        return
    unfuse_experts(model)
    fused = fused_expert_modules(model)
    if fused:
        fam = getattr(getattr(model, "config", None), "model_type", "?")
        raise QuantbenchError(f"recipe '{recipe.name}': {fam} stores its experts as fused 3-D tensors of a layout "
                              f"quantbench cannot split into linear layers ({fused[0]}); they would stay unquantized")
