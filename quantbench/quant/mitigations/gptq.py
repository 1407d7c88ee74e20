"""GPTQ (Frantar et al. 2023): quantize weights column by column, pushing each column's rounding
error onto the not-yet-quantized columns through the inverse Hessian H = XᵀX of the layer input.

Hessians are accumulated in one pass over the FP model for every target linear at once (inputs
shared by q/k/v or gate/up are accumulated once). This is the "parallel" variant: reference GPTQ
feeds each layer the outputs of the already-quantized previous layers; here every layer sees FP
inputs. The result is written back as dequantized weights on the recipe's grid, and the linear is
listed in ctx.prequantized so QuantLinear does not quantize it again (re-running RTN on GPTQ
output would pick a different scale whenever an extreme column value was moved by the updates).

Grid: per-channel and per-tensor scales come from the original weights; group scales are chosen
when the group's first column is reached (from the updated weights, as in reference GPTQ), or
from the original weights up front with act_order ("static groups", which keeps groups contiguous).

Hessian: by default each token's input row is scaled to unit RMS before H = XᵀX is accumulated
(token_norm: true, a deliberate departure from reference GPTQ). On the default model the BOS
token's massive activations (~10^4x the median) otherwise dominate H, and GPTQ's error feedback
then serves that one token at the expense of all others: measured on 4 x 512 tokens, W4
per-channel ppl 43.2 (RTN) -> 56.2 (plain H) -> 44.3 (token_norm, KL 0.78 vs RTN's 0.86), and
W4 g64 37.3 (RTN) -> 36.3 (plain) -> 31.4 (token_norm). More damping does not fix the plain H
(damp 1.0: 60.9; damp 1e-4: 79.4). token_norm: false gives reference GPTQ.

Options: damp (0.01, fraction of mean diag(H)), block (128), act_order (false), calib_samples (8), token_norm (true),
skip_first (0: positions left out of H; measured on the default model, leaving out the BOS token
makes W4 per-channel perplexity explode, 44 -> 288: its output must stay accurate).
"""
from __future__ import annotations

import sys
from typing import Any

import torch
import torch.nn as nn

from ..apply import target_linears
from ..primitives import dequantize, quantize
from ..spec import QuantSpec
from . import register
from ._util import calib_subset, get_weight, input_stats, require, set_weight
from .clip import block_qparams


def _fq_col(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Fake-quantize one column w [out] with per-row scale/zero [out]."""
    q = quantize(w[:, None, None], scale[:, None, None], zero[:, None, None], spec)  # [out, 1, 1]
    return dequantize(q, scale[:, None, None], zero[:, None, None], torch.float32).reshape(-1)


def _inverse_hessian_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of H^-1 (after damping), as in reference GPTQ."""
    n = h.shape[0]
    h = h + damp * torch.diagonal(h).mean() * torch.eye(n, dtype=h.dtype)
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(hinv, upper=True)


def _col_params(wq: torch.Tensor, spec: QuantSpec, col: int, orig_col: int,
                static: tuple | None, cur: tuple | None) -> tuple:
    """(scale, zero) [out] for column `col` (position in processing order)."""
    if static is not None:  # channel/tensor, or static groups (act_order) indexed by the original column
        j = orig_col // spec.group_size if spec.granularity == "group" else 0
        return static[0][:, j], static[1][:, j]
    g = spec.group_size
    if col % g == 0:
        return tuple(t[:, 0] for t in block_qparams(wq[:, col: col + g], spec.model_copy(
            update={"granularity": "channel", "group_size": None})))
    return cur


@torch.no_grad()
def gptq_quantize(w: torch.Tensor, h: torch.Tensor, spec: QuantSpec, damp: float = 0.01, block: int = 128,
                  act_order: bool = False) -> torch.Tensor:
    """w [out, in], h = XᵀX [in, in] -> dequantized weights [out, in] on spec's grid."""
    w = w.float().clone()
    h = h.double().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    static = None
    if spec.granularity != "group" or act_order:
        sc, ze = block_qparams(w, spec)  # [out, G] (group), [out, 1] (channel) or [1, 1] (tensor)
        static = (sc.expand(w.shape[0], -1), ze.expand(w.shape[0], -1))  # [out, G or 1]
    perm = torch.argsort(torch.diagonal(h), descending=True) if act_order else torch.arange(w.shape[1])
    w, h = w[:, perm], h[perm][:, perm]
    u = _inverse_hessian_factor(h, damp).float()
    if spec.granularity == "group":
        block = spec.group_size * max(1, block // spec.group_size)  # groups never straddle blocks
    n, cur = w.shape[1], None
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        err = torch.zeros(w.shape[0], i2 - i1)
        for i in range(i1, i2):
            cur = _col_params(w, spec, i, int(perm[i]), static, cur)
            q = _fq_col(w[:, i], *cur, spec)
            e = (w[:, i] - q) / u[i, i]
            w[:, i] = q
            w[:, i + 1: i2] -= e[:, None] * u[i, i + 1: i2][None, :]
            err[:, i - i1] = e
        w[:, i2:] -= err @ u[i1:i2, i2:]
    return w[:, torch.argsort(perm)]


def check(model: nn.Module, recipe) -> None:
    require(recipe, "weights", "gptq")


def calibrate(model: nn.Module, batches: torch.Tensor, opts: dict[str, Any], ctx) -> dict:
    check(model, ctx.recipe)
    mods = dict(target_linears(model, ctx.recipe))
    stats = input_stats(model, mods, calib_subset(batches, opts, 8), ctx, gram=True,
                        skip_first=int(opts.get("skip_first", 0)), token_norm=bool(opts.get("token_norm", True)))
    return {"mods": mods, "gram": {k: v["gram"] for k, v in stats.items()}}


@torch.no_grad()
def apply(model: nn.Module, stats: dict, opts: dict[str, Any], ctx) -> nn.Module:
    spec = ctx.recipe.weights
    for name, mod in stats["mods"].items():
        if name not in stats["gram"]:
            continue  # never called on the calibration data: left to plain RTN
        wq = gptq_quantize(get_weight(mod), stats["gram"][name], spec, float(opts.get("damp", 0.01)),
                           int(opts.get("block", 128)), bool(opts.get("act_order", False)))
        set_weight(mod, wq)
        ctx.prequantized.add(name)
    ctx.notes["gptq_layers"] = len(ctx.prequantized)
    return model


register("gptq", sys.modules[__name__])
