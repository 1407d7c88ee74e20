"""AWQ (Lin et al. 2024): activation-aware per-channel weight scaling, searched per smoothable pair.

For each pair prev -> targets (norm -> q/k/v, norm -> gate/up, up -> down, v -> o) and each alpha in
`grid` (0 always included):

    s = mean|X|^alpha, normalised by sqrt(max(s) min(s));   err(alpha) = sum_t ||X (Q(W_t s)/s - W_t)^T||^2

on a sample X of `search_tokens` calibration rows, Q = the recipe's weight quantizer. The best s
is folded exactly like SmoothQuant (prev's output / s, targets' input columns * s); QuantLinear then
quantizes W s by plain RTN, which is exactly the Q(W s) that was evaluated. alpha = 0 is plain RTN,
so the chosen scales are never worse than RTN on this objective. Under GQA the v -> o scales are
shared per kv head (mean |X| averaged over the query heads of a group).

Options: grid (default 0.0, 0.1, ..., 0.9), pairs (default qkv, up, down, o), search_tokens (512),
calib_samples (8).
"""
from __future__ import annotations

import sys
from typing import Any

import torch
import torch.nn as nn

from ..primitives import fake_quant
from ..spec import QuantSpec
from . import register
from ._util import Pair, calib_subset, find_pairs, get_weight, input_stats, require, require_arch, scale_in, scale_out

DEFAULT_GRID = tuple(i / 10 for i in range(10))


def awq_scales(absmean: torch.Tensor, alpha: float) -> torch.Tensor:
    s = absmean.clamp_min(1e-4).pow(alpha)
    return s / (s.max() * s.min()).sqrt()


def pair_error(pair: Pair, x: torch.Tensor, s: torch.Tensor, spec: QuantSpec) -> float:
    """sum over targets of ||X (Q(W s)/s - W)^T||^2; x [N, in] target input, s [prev channels]."""
    st = pair.expand(s)[None, :]  # [1, in]
    err = 0.0
    for _, mod in pair.targets:
        w = get_weight(mod)  # [out, in]
        err += (x @ (fake_quant(w * st, spec) / st - w).T).pow(2).sum().item()
    return err


@torch.no_grad()
def search_pair(pair: Pair, x: torch.Tensor, absmean: torch.Tensor, spec: QuantSpec,
                grid: tuple[float, ...]) -> tuple[float, float, float]:
    """-> (best alpha, its error, RTN error)."""
    errs = {a: pair_error(pair, x, awq_scales(absmean, a), spec) for a in sorted(set(grid) | {0.0})}
    best = min(errs, key=errs.get)
    return best, errs[best], errs[0.0]


def check(model: nn.Module, recipe) -> None:
    require(recipe, "weights", "awq")
    require_arch(model, "awq")


def calibrate(model: nn.Module, batches: torch.Tensor, opts: dict[str, Any], ctx) -> dict:
    check(model, ctx.recipe)
    notes: list[str] = []
    pairs = find_pairs(model, ctx.arch, tuple(opts.get("pairs", ("qkv", "up", "down", "o"))), notes)
    stats = input_stats(model, {p.key: p.targets[0][1] for p in pairs}, calib_subset(batches, opts, 8), ctx,
                        sample_tokens=int(opts.get("search_tokens", 512)))
    return {"pairs": pairs, "x": {p.key: stats[p.key]["sample"] for p in pairs},
            "absmean": {p.key: p.reduce(stats[p.key]["absmean"], "mean") for p in pairs}, "skipped": notes}


@torch.no_grad()
def apply(model: nn.Module, stats: dict, opts: dict[str, Any], ctx) -> nn.Module:
    spec, grid = ctx.recipe.weights, tuple(float(a) for a in opts.get("grid", DEFAULT_GRID))
    alphas, err, err0 = [], 0.0, 0.0
    for p in stats["pairs"]:
        a, e, e0 = search_pair(p, stats["x"][p.key], stats["absmean"][p.key], spec, grid)
        s = awq_scales(stats["absmean"][p.key], a)
        scale_out(p.prev, 1.0 / s)
        for _, mod in p.targets:
            scale_in(mod, p.expand(s))
        alphas.append(a)
        err, err0 = err + e, err0 + e0
    ctx.notes["awq_alpha_mean"] = round(sum(alphas) / max(len(alphas), 1), 3)
    ctx.notes["awq_err_vs_rtn"] = round(err / max(err0, 1e-30), 4)
    return model


register("awq", sys.modules[__name__])
