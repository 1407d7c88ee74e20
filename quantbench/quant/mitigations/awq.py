"""AWQ (Lin et al. 2024): activation-aware per-channel weight scaling, searched per smoothable pair.

For each pair prev -> targets (norm -> q/k/v, norm -> gate/up, up -> down, v -> o) and each alpha in
`grid` (0 always included):

    s = mean|X|^alpha, normalised by sqrt(max(s) min(s));   err(alpha) = sum_t ||X (Q(W_t s)/s - W_t)^T||^2

on a sample X of `search_tokens` calibration rows, Q = each target's weight quantizer from the plan.
The best s is folded exactly like SmoothQuant (prev's output / s, targets' input columns * s); the
backend then quantizes W s by round-to-nearest, which is exactly the Q(W s) that was evaluated.
alpha = 0 is plain RTN, so the chosen scales are never worse than RTN on this objective. Under GQA
the v -> o scales are shared per kv head (mean |X| averaged over the query heads of a group).

Block outputs (option `block: true`, as llm-awq's `module2inspect=mlp`): the norm -> gate/up pairs are
searched on the error of the whole MLP's output, err(alpha) = ||MLP_q(X) - MLP(X)||^2 with gate and up
fake-quantized (Q(W s)/s) and down left as it is, so the search sees what the gate's and up's rounding
does after the activation and the product. q/k/v stay per linear (llm-awq inspects the attention
block there; that needs the layer's position embeddings and masks), as do up -> down and v -> o (a
single linear, as in llm-awq). Pairs whose targets do not share one parent module (MoE, parallel
blocks) fall back to the per-linear error.

Options: grid (default 0.0, 0.1, ..., 0.9), pairs (default qkv, up, down, o), search_tokens (512),
calib_samples (8), block (false).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
from pydantic import Field

from ...modeling.surgery import get_weight, set_weight
from ..calibration import StatsRequest
from ..effects import Effects
from ..plugin import Mitigation, Options, QuantContext
from ..primitives import fake_quant
from ..spec import MITIGATIONS, QuantSpec
from ._util import Pair, find_pairs, pair_inputs, with_stats


def awq_scales(absmean: torch.Tensor, alpha: float) -> torch.Tensor:
    """llm-awq: s = mean|X|^alpha clamped at 1e-4 (after the power), normalised by sqrt(max(s) min(s))."""
    s = absmean.pow(alpha).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def pair_error(pair: Pair, x: torch.Tensor, s: torch.Tensor, specs: dict[str, QuantSpec | None]) -> float:
    """sum over targets of ||X (Q(W s)/s - W)^T||^2; x [N, in] target input, s [prev channels]."""
    st = pair.expand(s)[None, :]  # [1, in]
    err = 0.0
    for name, mod in pair.targets:
        spec = specs.get(name)
        if spec is None:
            continue  # a target left in full precision has no rounding error
        w = get_weight(mod)  # [out, in]
        err += (x @ (fake_quant(w * st, spec) / st - w).T).pow(2).sum().item()
    return err


@torch.no_grad()
def block_error(pair: Pair, block: nn.Module, x: torch.Tensor, ref: torch.Tensor, s: torch.Tensor,
                specs: dict[str, QuantSpec | None]) -> float:
    """||block(X) - ref||^2 with every target's weight replaced by Q(W s)/s for the call (then restored)."""
    st = pair.expand(s)[None, :]  # [1, in]
    saved = []
    try:
        for name, mod in pair.targets:
            spec = specs.get(name)
            if spec is None:
                continue
            w = get_weight(mod)
            saved.append((mod, w))
            set_weight(mod, fake_quant(w * st, spec) / st)
        return float((block(x) - ref).pow(2).sum())
    finally:
        for mod, w in saved:
            set_weight(mod, w)


def block_of(pair: Pair, model: nn.Module) -> nn.Module | None:
    """The module whose output the pair's block error is measured on: the targets' common parent, for
    norm -> gate/up pairs of a plain MLP (None otherwise)."""
    parents = {name.rpartition(".")[0] for name, _ in pair.targets}
    if pair.kind != "up" or len(parents) != 1:
        return None
    parent = model.get_submodule(parents.pop())
    names = {n for n, _ in parent.named_children()}
    return parent if len(names & {"down_proj", "c_proj", "fc2", "w2"}) == 1 and "experts" not in names else None


@torch.no_grad()
def search_pair(pair: Pair, x: torch.Tensor, absmean: torch.Tensor, specs: dict[str, QuantSpec | None] | QuantSpec,
                grid: tuple[float, ...], block: nn.Module | None = None) -> tuple[float, float, float]:
    """-> (best alpha, its error, RTN error). specs: per target name, or one spec for all targets.
    block: measure the error on this module's output instead of the targets' (see the module doc)."""
    if isinstance(specs, QuantSpec):
        specs = {name: specs for name, _ in pair.targets}
    if block is not None:
        ref = block(x)
        err = lambda a: block_error(pair, block, x, ref, awq_scales(absmean, a), specs)  # noqa: E731
    else:
        err = lambda a: pair_error(pair, x, awq_scales(absmean, a), specs)  # noqa: E731
    errs = {a: err(a) for a in sorted(set(grid) | {0.0})}
    best = min(errs, key=errs.get)
    return best, errs[best], errs[0.0]


@dataclass
class Stats:
    pairs: list[Pair]
    x: dict[str, torch.Tensor]  # pair key -> sampled input rows [N, in]
    absmean: dict[str, torch.Tensor]  # pair key -> mean|X| per prev channel


@MITIGATIONS.register("awq")
class AWQ(Mitigation):
    name = "awq"
    needs = ("weights", "arch")

    class Options(Options):
        grid: tuple[float, ...] = tuple(i / 10 for i in range(10))
        pairs: tuple[Literal["qkv", "up", "down", "o"], ...] = ("qkv", "up", "down", "o")
        search_tokens: int = Field(512, ge=8)
        calib_samples: int = Field(8, ge=1)
        block: bool = False

    def calibrate(self, model: nn.Module, ctx: QuantContext, opts: Options) -> Stats:
        pairs = find_pairs(model, ctx.arch, opts.pairs)
        req = StatsRequest(samples=opts.calib_samples, sample_tokens=opts.search_tokens)
        stats = ctx.calib.input_stats(model, pair_inputs(pairs), ctx.upstream, req)
        pairs = with_stats(pairs, stats)
        return Stats(pairs, {p.key: stats[p.key].sample for p in pairs},
                     {p.key: p.reduce(stats[p.key].absmean, "mean") for p in pairs})

    @torch.no_grad()
    def apply(self, model: nn.Module, stats: Stats, ctx: QuantContext, opts: Options) -> Effects:
        specs = {n: lp.weights for n, lp in ctx.plan.linears.items()}
        alphas, err, err0, blocks = [], 0.0, 0.0, 0
        for p in stats.pairs:
            blk = block_of(p, model) if opts.block else None
            blocks += blk is not None
            a, e, e0 = search_pair(p, stats.x[p.key], stats.absmean[p.key], specs, opts.grid, blk)
            p.fold(awq_scales(stats.absmean[p.key], a))
            alphas.append(a)
            err, err0 = err + e, err0 + e0
        return Effects(notes={"awq_alpha_mean": round(sum(alphas) / max(len(alphas), 1), 3),
                              **({"awq_block_pairs": blocks} if opts.block else {}),
                              "awq_err_vs_rtn": round(err / max(err0, 1e-30), 4)})
