"""SmoothQuant (Xiao et al. 2023): move activation outliers into the weights.

For each smoothable pair prev -> targets (arch.smooth_pairs: norm -> q/k/v, norm -> gate/up,
up -> down, v -> o), per input channel j

    s_j = max|X_j|^alpha / max_t max|W_t[:, j]|^(1 - alpha)

prev's output channel j is divided by s_j (norm weight/bias, or a linear's row and bias) and
every target's input column j multiplied by s_j: the FP function is unchanged (up -> down is
exact because down's input is act(gate) * up; v -> o because attention mixes V linearly per head).
Under grouped-query attention one v channel feeds `rep` query heads, so o's scales are v's
scales repeated per head group (statistics reduced by max over the group first).

Options:
  alpha: float in [0, 1] or "search" (default 0.5). "search" picks alpha per pair from
      alpha_grid by the output error of the recipe's weight and activation quantizers
      ||Q_a(X/s) Q_w(W s)^T - X W^T||^2 on the first `search_tokens` tokens of the first
      calibration sequence (activation quantizer run dynamically on that sample).
  alpha_grid: list of floats (default [0.3, 0.4, 0.5, 0.6, 0.7, 0.8]).
  pairs: subset of [qkv, up, down, o] (default all four).
  calib_samples: calibration sequences used for max|X| (default 8).
"""
from __future__ import annotations

import sys
from typing import Any

import torch
import torch.nn as nn

from ..primitives import fake_quant
from ..spec import QuantSpec
from . import register
from ._util import Pair, calib_subset, require_arch, find_pairs, get_weight, input_hooks, input_stats, run_model, scale_in, scale_out

DEFAULT_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


def pair_scales(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s [D] = x^alpha / w^(1-alpha); channels never active (or all-zero weights) keep s = 1."""
    s = x_absmax.clamp_min(1e-5).pow(alpha) / w_absmax.clamp_min(1e-5).pow(1 - alpha)
    return torch.where((x_absmax > 0) & (w_absmax > 0), s, torch.ones_like(s)).clamp(1e-4, 1e4)


def weight_absmax(pair: Pair) -> torch.Tensor:
    """max over targets and output rows of |W[:, j]|, per target input channel j, reduced to prev channels."""
    w = torch.stack([get_weight(m).abs().amax(0) for _, m in pair.targets]).amax(0)  # [in]
    return pair.reduce(w, "max")


def _pair_error(x: torch.Tensor, pair: Pair, s: torch.Tensor, wspec: QuantSpec | None,
                aspec: QuantSpec | None) -> float:
    """sum over targets of ||Q_a(X / s) Q_w(W s)^T - X W^T||^2 (x: [N, in] target input)."""
    st = pair.expand(s)
    xs = x / st
    xq = fake_quant(xs, aspec) if aspec is not None else xs
    err = 0.0
    for _, mod in pair.targets:
        w = get_weight(mod)  # [out, in]
        ws = w * st[None, :]
        wq = fake_quant(ws, wspec) if wspec is not None else ws
        err += (xq @ wq.T - x @ w.T).pow(2).sum().item()
    return err


@torch.no_grad()
def _search(model: nn.Module, pairs: list[Pair], absmax: dict[str, torch.Tensor], batches: torch.Tensor,
            opts: dict[str, Any], ctx) -> dict[str, float]:
    grid = tuple(float(a) for a in opts.get("alpha_grid", DEFAULT_GRID))
    ntok = int(opts.get("search_tokens", 128))
    wspec, aspec = ctx.recipe.weights, ctx.recipe.activations
    if aspec is not None and not aspec.dynamic:
        aspec = aspec.model_copy(update={"dynamic": True})
    by_key = {p.key: p for p in pairs}
    errs: dict[str, list[float]] = {}

    def acc(key: str, x: torch.Tensor) -> None:
        p = by_key[key]
        xr = x.to(torch.float32).cpu()
        e = [_pair_error(xr, p, pair_scales(absmax[key], weight_absmax(p), a), wspec, aspec) for a in grid]
        errs[key] = [u + v for u, v in zip(errs.get(key, [0.0] * len(grid)), e)]

    with input_hooks({p.key: p.targets[0][1] for p in pairs}, acc):  # one module per pair: no aliases
        run_model(model, batches[:1, :ntok], 1, ctx.device)
    return {k: grid[min(range(len(grid)), key=lambda i: v[i])] for k, v in errs.items()}


def check(model: nn.Module, recipe) -> None:
    require_arch(model, "smoothquant")


def calibrate(model: nn.Module, batches: torch.Tensor, opts: dict[str, Any], ctx) -> dict:
    notes: list[str] = []
    pairs = find_pairs(model, ctx.arch, tuple(opts.get("pairs", ("qkv", "up", "down", "o"))), notes)
    stats = input_stats(model, {p.key: p.targets[0][1] for p in pairs}, calib_subset(batches, opts, 8), ctx)
    absmax = {p.key: p.reduce(stats[p.key]["absmax"], "max") for p in pairs}
    alpha = opts.get("alpha", 0.5)
    if alpha == "search":
        alphas = _search(model, pairs, absmax, batches, opts, ctx)
    else:
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"smoothquant alpha must be in [0, 1] or 'search', got {alpha}")
        alphas = {p.key: float(alpha) for p in pairs}
    return {"pairs": pairs, "absmax": absmax, "alphas": alphas, "skipped": notes}


@torch.no_grad()
def apply(model: nn.Module, stats: dict, opts: dict[str, Any], ctx) -> nn.Module:
    for p in stats["pairs"]:
        s = pair_scales(stats["absmax"][p.key], weight_absmax(p), stats["alphas"][p.key])
        scale_out(p.prev, 1.0 / s)
        for _, mod in p.targets:
            scale_in(mod, p.expand(s))
    a = list(stats["alphas"].values())
    ctx.notes["smoothquant_pairs"] = len(stats["pairs"])
    ctx.notes["smoothquant_alpha_mean"] = round(sum(a) / max(len(a), 1), 3)
    if stats["skipped"]:
        ctx.notes["smoothquant_skipped"] = len(stats["skipped"])
    return model


register("smoothquant", sys.modules[__name__])
