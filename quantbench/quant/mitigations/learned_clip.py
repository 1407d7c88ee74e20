"""Learned weight clipping (OmniQuant's LWC, Shao et al. 2024), per linear, without a training loop
over the model.

For every target linear W [out, in] and every weight block of its spec (per output channel or per
group), learn clip factors in (0, 1) through a sigmoid of a free logit:

    asymmetric: hi' = sigmoid(g) * max(W_b, 0),   lo' = sigmoid(b) * min(W_b, 0)      (OmniQuant's γ, β)
    symmetric:  absmax' = sigmoid(g) * max|W_b|                                        (one factor)

The block is quantized on the recipe's grid (quant/primitives.py) from the clipped range, rounding
through a straight-through estimator, and Adam minimizes the linear's output error on calibration
inputs X (a sample of `search_tokens` rows spread evenly over the calibration tokens):

    L = ||X (Q_θ(W) - W)^T||^2 / ||X W^T||^2          (all blocks at once: cross-group terms included)

With `token_norm` (default true) each row of X is scaled to unit RMS first, as GPTQ's Hessian here
(quant/mitigations/gptq.py): the BOS token's massive activations would otherwise decide every factor.

Initialisation: `init: grid` starts from the clip ratios of `clip`'s grid search (the per-block
objective without cross-group terms), `init: <float>` from that logit everywhere (OmniQuant: 4.0).
The forward value of every step is the exact quantized loss (the STE only changes gradients); the
best iterate is kept, so the result is never worse than its initialisation on L.

The weights are then clamped in place to the learned per-block range, so the backend's later
round-to-nearest reproduces exactly the grid that was learned (the clamped block's range is the
clipped range; values beyond it would round to the edge codes anyway).

Options: steps (50), lr (0.05, cosine-annealed; the best iterate on L is kept), search_tokens (256),
calib_samples (8), token_norm (true), init ("grid" or a logit), ratios (the grid for init: grid;
clip's default).
Cost on the default model (2 CPU cores): a few minutes at the defaults (the error is a [N, in] x
[in, out] product per linear and step).
"""
from __future__ import annotations

from typing import Literal, Union

import torch
import torch.nn as nn
from pydantic import Field

from ...modeling.surgery import get_weight, set_weight
from ..effects import Effects
from ..plugin import Mitigation, Options, QuantContext
from ..primitives import blocks, code_range
from ..spec import MITIGATIONS, QuantSpec
from .clip import DEFAULT_RATIOS, Stats, sampled_inputs, search_clip


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def block_bounds(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi) per block [R, G, 1] of w with 0 included, as the grid's qparams take them."""
    wb = blocks(w.float(), spec.granularity, spec.group_size)  # [R, G, B]
    return wb.amin(-1, keepdim=True).clamp_max(0.0), wb.amax(-1, keepdim=True).clamp_min(0.0)


def clipped_range(w: torch.Tensor, spec: QuantSpec, g: torch.Tensor, b: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo', hi') [R, G, 1] from factors g, b in (0, 1] [R, G] (b ignored when symmetric: one factor)."""
    lo, hi = block_bounds(w, spec)
    if spec.symmetric:
        a = torch.maximum(-lo, hi) * g[..., None]
        return -a, a
    return lo * b[..., None], hi * g[..., None]


def lwc_fake_quant(w: torch.Tensor, spec: QuantSpec, g: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """w [out, in] clamped to the clipped block ranges and quantized on spec's grid (the formulas of
    quant/primitives.py, so it equals the backend's RTN of clamp_to's weights, ties included); rounding
    through a straight-through estimator, so the result is differentiable in g and b."""
    wb = blocks(w.float(), spec.granularity, spec.group_size)  # [R, G, B]
    lo, hi = clipped_range(w, spec, g, b)
    qmin, qmax = code_range(spec)
    if spec.symmetric:
        scale = (hi / ((qmax - qmin) / 2)).clamp_min(torch.finfo(torch.float32).eps)
        zero = torch.zeros_like(scale)
    else:
        scale = ((hi - lo) / (qmax - qmin)).clamp_min(torch.finfo(torch.float32).eps)
        zero = _round_ste(torch.clamp(qmin - lo / scale, qmin, qmax))
    wb = torch.maximum(torch.minimum(wb, hi), lo)  # the clamped weights the backend will see (same ties)
    q = _round_ste(torch.clamp(wb / scale + zero, qmin, qmax))
    return ((q - zero) * scale).reshape(w.shape)


def clamp_to(w: torch.Tensor, spec: QuantSpec, g: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """w clamped per block to its learned range (what the backend's RTN then quantizes)."""
    wb = blocks(w.float(), spec.granularity, spec.group_size)
    lo, hi = clipped_range(w, spec, g, b)
    return torch.maximum(torch.minimum(wb, hi), lo).reshape(w.shape).to(w.dtype)


def _logit(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(1e-4, 1 - 1e-4)
    return torch.log(p / (1 - p))


def learn_clip(w: torch.Tensor, x: torch.Tensor, spec: QuantSpec, steps: int = 50, lr: float = 0.05,
               init: torch.Tensor | float = 4.0) -> tuple[torch.Tensor, torch.Tensor | None, float, float]:
    """-> (g [R, G], b [R, G] or None, loss at init, loss at the kept factors) for weights w [out, in]
    and inputs x [N, in]. init: a ratio per block [R, G] (e.g. the grid search's) or one logit."""
    w = w.detach().float()
    x = x.detach().float()
    shape = blocks(w, spec.granularity, spec.group_size).shape[:2]
    l0 = _logit(init) if torch.is_tensor(init) else torch.full(shape, float(init))
    gl = l0.clone().requires_grad_(True)
    bl = None if spec.symmetric else l0.clone().requires_grad_(True)
    ref = (x @ w.T).pow(2).sum().clamp_min(1e-30)

    def loss(gp: torch.Tensor, bp: torch.Tensor | None) -> torch.Tensor:
        d = lwc_fake_quant(w, spec, torch.sigmoid(gp), None if bp is None else torch.sigmoid(bp)) - w
        return (x @ d.T).pow(2).sum() / ref

    params = [p for p in (gl, bl) if p is not None]
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    best = (float("inf"), gl.detach().clone(), None if bl is None else bl.detach().clone())
    start = None
    for step in range(steps + 1):
        opt.zero_grad(set_to_none=True)
        cur = loss(gl, bl)  # the forward value is the exact quantized loss (the STE only changes gradients)
        val = float(cur.detach())
        start = val if start is None else start
        if val < best[0]:
            best = (val, gl.detach().clone(), None if bl is None else bl.detach().clone())
        if step == steps:
            break
        cur.backward()
        opt.step()
        sched.step()
    _, g, b = best
    return torch.sigmoid(g), None if b is None else torch.sigmoid(b), start, best[0]


@MITIGATIONS.register("learned_clip")
class LearnedClip(Mitigation):
    name = "learned_clip"
    needs = ("weights",)

    @classmethod
    def spec_issue(cls, weights: QuantSpec | None, activations: QuantSpec | None) -> str | None:
        if weights is not None and (weights.micro or weights.granularity == "block"):
            return f"weights {weights.short()} are not supported: its differentiable quantizer is the int/fp8 grid's"
        return None

    class Options(Options):
        steps: int = Field(50, ge=0)
        lr: float = Field(0.05, gt=0)
        search_tokens: int = Field(256, ge=8)
        calib_samples: int = Field(8, ge=1)
        token_norm: bool = True
        init: Union[Literal["grid"], float] = "grid"
        ratios: tuple[float, ...] = DEFAULT_RATIOS

    def calibrate(self, model: nn.Module, ctx: QuantContext, opts: Options) -> Stats:
        return sampled_inputs(model, ctx, opts.calib_samples, opts.search_tokens)

    def apply(self, model: nn.Module, stats: Stats, ctx: QuantContext, opts: Options) -> Effects:
        specs = ctx.plan.weight_specs()
        gains, clipped, total = [], 0, 0
        for name, mod in stats.mods.items():
            if name not in stats.x:
                continue
            w, spec, x = get_weight(mod), specs[name], stats.x[name].float()
            if opts.token_norm:
                x = x / x.pow(2).mean(1, keepdim=True).sqrt().clamp_min(1e-12)
            with torch.no_grad():
                init = search_clip(w, x, spec, opts.ratios)[0] if opts.init == "grid" else float(opts.init)
                rtn = _rtn_loss(w, x, spec)
            with torch.enable_grad():
                g, b, _, end = learn_clip(w, x, spec, opts.steps, opts.lr, init)
            with torch.no_grad():
                set_weight(mod, clamp_to(w, spec, g, b))
            gains.append(end / max(rtn, 1e-30))
            clipped, total = clipped + int((g < 0.999).sum()), total + g.numel()
        return Effects(notes={"learned_clip_blocks_clipped_pct": round(100 * clipped / max(total, 1), 1),
                              "learned_clip_err_vs_rtn": round(sum(gains) / max(len(gains), 1), 4)})


@torch.no_grad()
def _rtn_loss(w: torch.Tensor, x: torch.Tensor, spec: QuantSpec) -> float:
    ones = torch.ones(blocks(w, spec.granularity, spec.group_size).shape[:2])
    d = lwc_fake_quant(w.float(), spec, ones, None if spec.symmetric else ones) - w.float()
    return float((x @ d.T).pow(2).sum() / (x @ w.float().T).pow(2).sum().clamp_min(1e-30))
