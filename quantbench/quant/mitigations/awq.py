"""AWQ (Lin et al. 2024): activation-aware per-channel weight scaling, searched per smoothable pair.

For each pair prev -> targets (norm -> q/k/v, norm -> gate/up, up -> down, v -> o) and each alpha in
`grid` (0 always included):

    s = mean|X|^alpha, normalised by sqrt(max(s) min(s));   err(alpha) = sum_t ||X (Q(W_t s)/s - W_t)^T||^2

on a sample X of `search_tokens` calibration rows, Q = each target's weight quantizer from the plan.
The best s is folded exactly like SmoothQuant (prev's output / s, targets' input columns * s); the
backend then quantizes W s by round-to-nearest, which is exactly the Q(W s) that was evaluated.
alpha = 0 is plain RTN, so the chosen scales are never worse than RTN on this objective. Under GQA
the v -> o scales are shared per kv head (mean |X| averaged over the query heads of a group).

Options: grid (default 0.0, 0.1, ..., 0.9), pairs (default qkv, up, down, o), search_tokens (512),
calib_samples (8).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
from pydantic import Field

from ...surgery import get_weight
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
def search_pair(pair: Pair, x: torch.Tensor, absmean: torch.Tensor, specs: dict[str, QuantSpec | None] | QuantSpec,
                grid: tuple[float, ...]) -> tuple[float, float, float]:
    """-> (best alpha, its error, RTN error). specs: per target name, or one spec for all targets."""
    if isinstance(specs, QuantSpec):
        specs = {name: specs for name, _ in pair.targets}
    errs = {a: pair_error(pair, x, awq_scales(absmean, a), specs) for a in sorted(set(grid) | {0.0})}
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
        alphas, err, err0 = [], 0.0, 0.0
        for p in stats.pairs:
            a, e, e0 = search_pair(p, stats.x[p.key], stats.absmean[p.key], specs, opts.grid)
            p.fold(awq_scales(stats.absmean[p.key], a))
            alphas.append(a)
            err, err0 = err + e, err0 + e0
        return Effects(notes={"awq_alpha_mean": round(sum(alphas) / max(len(alphas), 1), 3),
                              "awq_err_vs_rtn": round(err / max(err0, 1e-30), 4)})
