"""SmoothQuant (Xiao et al. 2023): move activation outliers into the weights.

For each smoothable pair prev -> targets (the traced, verified pairs of quant/mitigations/_util.py:
norm -> q/k/v, norm -> gate/up (every expert and the router of an MoE block), up -> down, v -> o),
per input channel j

    s_j = max|X_j|^alpha / max_t max|W_t[:, j]|^(1 - alpha)

prev's output channel j is divided by s_j (norm weight/bias, Gemma's (1 + w), or a linear's row and
bias) and every target's input column j multiplied by s_j: the FP function is unchanged (up -> down
is exact because down's input is act(gate) * up; v -> o because attention mixes V linearly per head).
Under grouped-query attention one v channel feeds `rep` query heads, so o's scales are v's
scales repeated per head group (statistics reduced by max over the group first).

Options:
  alpha: float in [0, 1] or "search" (default 0.5). "search" picks alpha per pair from
      alpha_grid by the output error of the plan's weight and activation quantizers
      ||Q_a(X/s) Q_w(W s)^T - X W^T||^2 on the first `search_tokens` tokens of the first
      calibration sequence (activation quantizer run dynamically on that sample).
  alpha_grid: list of floats (default [0.3, 0.4, 0.5, 0.6, 0.7, 0.8]).
  pairs: subset of [qkv, up, down, o] (default all four).
  calib_samples: calibration sequences used for max|X| (default 8).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
from pydantic import Field, model_validator

from ...core.hooks import input_hooks
from ...modeling.surgery import get_weight, run_batches
from ..calibration import StatsRequest
from ..effects import Effects
from ..plugin import Mitigation, Options, QuantContext
from ..primitives import fake_quant
from ..spec import MITIGATIONS, QuantSpec
from ._util import Pair, find_pairs, pair_inputs, with_stats

PairKind = Literal["qkv", "up", "down", "o"]


def pair_scales(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s [D] = x^alpha / w^(1-alpha); channels never active (or all-zero weights) keep s = 1."""
    s = x_absmax.clamp_min(1e-5).pow(alpha) / w_absmax.clamp_min(1e-5).pow(1 - alpha)
    return torch.where((x_absmax > 0) & (w_absmax > 0), s, torch.ones_like(s)).clamp(1e-4, 1e4)


def _pair_error(x: torch.Tensor, pair: Pair, s: torch.Tensor, specs: dict[str, tuple]) -> float:
    """sum over targets of ||Q_a(X / s) Q_w(W s)^T - X W^T||^2 (x: [N, in] target input)."""
    st = pair.expand(s)
    xs = x / st
    err = 0.0
    for name, mod in pair.targets:
        wspec, aspec = specs.get(name, (None, None))
        xq = fake_quant(xs, aspec) if aspec is not None else xs
        w = get_weight(mod)  # [out, in]
        ws = w * st[None, :]
        wq = fake_quant(ws, wspec) if wspec is not None else ws
        err += (xq @ wq.T - x @ w.T).pow(2).sum().item()
    return err


@dataclass
class Stats:
    pairs: list[Pair]
    absmax: dict[str, torch.Tensor]  # pair key -> max|X| per prev channel
    alphas: dict[str, float]
    skipped: list[str]


@MITIGATIONS.register("smoothquant")
class SmoothQuant(Mitigation):
    name = "smoothquant"
    needs = ("arch",)

    class Options(Options):
        alpha: float | Literal["search"] = Field(0.5)
        alpha_grid: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
        search_tokens: int = Field(128, ge=8)
        pairs: tuple[PairKind, ...] = ("qkv", "up", "down", "o")
        calib_samples: int = Field(8, ge=1)

        @model_validator(mode="after")
        def _range(self):
            if self.alpha != "search" and not 0.0 <= float(self.alpha) <= 1.0:
                raise ValueError(f"alpha must be in [0, 1] or 'search', got {self.alpha}")
            if any(not 0.0 <= a <= 1.0 for a in self.alpha_grid):
                raise ValueError("alpha_grid values must be in [0, 1]")
            return self

    def calibrate(self, model: nn.Module, ctx: QuantContext, opts: Options) -> Stats:
        notes: list[str] = []
        pairs = find_pairs(model, ctx.arch, opts.pairs, notes)
        stats = ctx.calib.input_stats(model, pair_inputs(pairs), ctx.upstream, StatsRequest(samples=opts.calib_samples))
        pairs = with_stats(pairs, stats, notes)
        absmax = {p.key: p.reduce(stats[p.key].absmax, "max") for p in pairs}
        if opts.alpha == "search":
            alphas = _search(model, pairs, absmax, ctx, opts)
        else:
            alphas = {p.key: float(opts.alpha) for p in pairs}
        return Stats(pairs, absmax, alphas, notes)

    @torch.no_grad()
    def apply(self, model: nn.Module, stats: Stats, ctx: QuantContext, opts: Options) -> Effects:
        for p in stats.pairs:
            p.fold(pair_scales(stats.absmax[p.key], p.weight_absmax(), stats.alphas[p.key]))
        a = list(stats.alphas.values())
        notes = {"smoothquant_pairs": len(stats.pairs), "smoothquant_alpha_mean": round(sum(a) / max(len(a), 1), 3)}
        if stats.skipped:
            notes["smoothquant_skipped"] = len(stats.skipped)
        return Effects(notes=notes)


@torch.no_grad()
def _search(model: nn.Module, pairs: list[Pair], absmax: dict[str, torch.Tensor], ctx: QuantContext,
            opts) -> dict[str, float]:
    grid = tuple(float(a) for a in opts.alpha_grid)
    specs: dict[str, tuple[QuantSpec | None, QuantSpec | None]] = {}
    for name, lp in ctx.plan.linears.items():
        a = lp.activations
        specs[name] = (lp.weights, a.model_copy(update={"dynamic": True}) if a is not None and not a.dynamic else a)
    by_key = {p.key: p for p in pairs}
    errs: dict[str, list[float]] = {}

    def acc(key: str, x: torch.Tensor) -> None:
        p = by_key[key]
        xr = x.to(torch.float32).cpu()
        e = [_pair_error(xr, p, pair_scales(absmax[key], p.weight_absmax(), a), specs) for a in grid]
        errs[key] = [u + v for u, v in zip(errs.get(key, [0.0] * len(grid)), e)]

    with input_hooks(pair_inputs(pairs), acc):  # one module per pair: no aliases
        run_batches(model, ctx.calib.batches[:1, :opts.search_tokens], 1, ctx.device)
    return {k: grid[min(range(len(grid)), key=lambda i: v[i])] for k, v in errs.items()}
