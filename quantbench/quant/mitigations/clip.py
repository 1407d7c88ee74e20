"""Weight clipping search (as AWQ's auto-clip / OmniQuant's LWC without training).

For every target linear and every weight block of its weight spec (per output channel,
per group, or the whole tensor), pick the clip ratio r from `ratios` (1.0 always included) that
minimises the layer output error on calibration inputs X (a sample of `search_tokens` rows spread
evenly over the calibration tokens):

    channel: ||X (Q(W_r) - W)_i^T||^2 per row i        group: ||X_g (Q(W_r) - W)_{i,g}^T||^2 per (row, group)

(the group objective ignores cross-group terms, as AWQ does). The weights are then clamped in place
to the chosen per-block range, so the backend's later round-to-nearest picks exactly the clipped
grid that was evaluated: no pre-quantization needed. Each linear uses its own weight spec from
the plan. r = 1 reproduces plain RTN, hence the result is never worse than RTN on this objective.

NVFP4: a block's scale is e4m3(global * absmax / 6) under the tensor's fp32 global scale, which the
backend takes from the (clamped) weight's own absmax. The search evaluates every block under the
unclipped weight's global scale, and the blocks holding the tensor's absmax keep r = 1, so the clamped
weight has the same absmax, hence the same global scale, and each block's rounding is the one searched
(tests/test_fp_gptq.py checks the backend's grid against the search's). MX blocks are independent (no
global scale); 2-D block weights are refused.

Options: ratios (default 1.0, 0.95, ..., 0.7), search_tokens (512), calib_samples (8).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from pydantic import Field

from ...modeling.surgery import get_weight, set_weight
from ..calibration import StatsRequest
from ..effects import Effects
from ..plugin import Mitigation, Options, QuantContext
from ..primitives import (block_range, blocks, compute_dtype, fake_quant, qparams_from_range, spec_blocks,
                          tensor_global_scale)
from ..spec import MITIGATIONS, QuantSpec

DEFAULT_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


def block_qparams(w: torch.Tensor, spec: QuantSpec, ratio: torch.Tensor | None = None,
                  global_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) per weight block, [R, G] (R = rows or 1, G = groups or 1; 2-D blocks: [out/g, in/g]);
    ratio [R, G] clips ranges; global_scale: nvfp4's fp32 global scale the block scales sit under."""
    wb = spec_blocks(w.float(), spec)  # [R, G, B]
    lo, hi = block_range(wb, spec)  # [R, G, 1]
    if ratio is not None:
        lo, hi = lo * ratio[..., None], hi * ratio[..., None]
    s, z = qparams_from_range(lo, hi, spec, global_scale)
    return s[..., 0], z[..., 0]


def clamp_blocks(w: torch.Tensor, spec: QuantSpec, ratio: torch.Tensor) -> torch.Tensor:
    """w [out, in] clamped per block to ratio * (its min, max); ratio [R, G]."""
    wb = blocks(w.float(), spec.granularity, spec.group_size)  # [R, G, B]
    lo, hi = wb.amin(-1, keepdim=True), wb.amax(-1, keepdim=True)  # [R, G, 1]
    r = ratio[..., None]
    return torch.maximum(torch.minimum(wb, hi * r), lo * r).reshape(w.shape)


def block_errors(x: torch.Tensor, d: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Output error per weight block [R, G] of a weight change d [out, in] on inputs x [N, in]."""
    if spec.granularity == "group":
        g = spec.group_size
        xg = x.reshape(x.shape[0], -1, g)  # [N, G, g]
        dg = d.reshape(d.shape[0], -1, g)  # [out, G, g]
        return torch.einsum("ngk,ogk->nog", xg, dg).pow(2).sum(0)  # [out, G]
    e = (x @ d.T).pow(2).sum(0)  # [out]
    return e[:, None] if spec.granularity == "channel" else e.sum().reshape(1, 1)


def pinned_blocks(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor | None:
    """nvfp4: the blocks [R, G] (bool) holding the tensor's absmax, which clipping must leave alone so that the
    clamped weight keeps its global scale; None for the formats without a global scale."""
    if spec.format != "nvfp4":
        return None
    wb = blocks(w.float(), spec.granularity, spec.group_size)  # [R, G, B]
    absmax = torch.max(wb.amin(-1).clamp_max(0).abs(), wb.amax(-1).clamp_min(0))  # [R, G]
    return absmax == absmax.max()


@torch.no_grad()
def search_clip(w: torch.Tensor, x: torch.Tensor, spec: QuantSpec, ratios: tuple[float, ...]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (best ratio [R, G], its error [R, G], RTN error [R, G]) for weights w [out, in], inputs x [N, in].
    nvfp4: every candidate under w's own global scale, the blocks holding its absmax unclipped (module doc)."""
    shape = blocks(w, spec.granularity, spec.group_size).shape[:2]
    gscale, pinned = tensor_global_scale(w.to(compute_dtype(w.dtype)), spec), pinned_blocks(w, spec)
    best_r, best_e, rtn_e = torch.ones(shape), torch.full(shape, float("inf")), None
    for r in sorted(set(ratios) | {1.0}, reverse=True):
        ratio = torch.full(shape, r)
        d = fake_quant(clamp_blocks(w, spec, ratio), spec, global_scale=gscale) - w
        e = block_errors(x, d, spec)
        rtn_e = e if r == 1.0 else rtn_e
        better = e < best_e
        if pinned is not None and r != 1.0:
            better &= ~pinned
        best_e, best_r = torch.where(better, e, best_e), torch.where(better, ratio, best_r)
    return best_r, best_e, rtn_e


@dataclass
class Stats:
    mods: dict[str, nn.Module]
    x: dict[str, torch.Tensor]  # linear -> sampled input rows [N, in]


def sampled_inputs(model: nn.Module, ctx: QuantContext, samples: int, tokens: int) -> Stats:
    """Sampled input rows of every linear whose weights the plan quantizes (clip, learned_clip)."""
    mods = {n: model.get_submodule(n) for n in ctx.plan.weight_specs()}
    stats = ctx.calib.input_stats(model, mods, ctx.upstream, StatsRequest(samples=samples, sample_tokens=tokens))
    return Stats(mods, {k: v.sample for k, v in stats.items()})


@MITIGATIONS.register("clip")
class Clip(Mitigation):
    name = "clip"
    needs = ("weights",)

    @classmethod
    def spec_issue(cls, weights: QuantSpec | None, activations: QuantSpec | None) -> str | None:
        if weights is not None and weights.granularity == "block":
            return f"weights {weights.short()} are not supported (the search clips rows, groups or the tensor)"
        return None

    class Options(Options):
        ratios: tuple[float, ...] = DEFAULT_RATIOS
        search_tokens: int = Field(512, ge=8)
        calib_samples: int = Field(8, ge=1)

    def calibrate(self, model: nn.Module, ctx: QuantContext, opts: Options) -> Stats:
        return sampled_inputs(model, ctx, opts.calib_samples, opts.search_tokens)

    @torch.no_grad()
    def apply(self, model: nn.Module, stats: Stats, ctx: QuantContext, opts: Options) -> Effects:
        specs = ctx.plan.weight_specs()
        gain, clipped, total = [], 0, 0
        for name, mod in stats.mods.items():
            if name not in stats.x:
                continue
            w, spec = get_weight(mod), specs[name]
            r, e, e0 = search_clip(w, stats.x[name], spec, opts.ratios)
            set_weight(mod, clamp_blocks(w, spec, r))
            gain.append(float(e.sum() / e0.sum().clamp_min(1e-30)))
            clipped, total = clipped + int((r < 1).sum()), total + r.numel()
        return Effects(notes={"clip_blocks_clipped_pct": round(100 * clipped / max(total, 1), 1),
                              "clip_err_vs_rtn": round(sum(gain) / max(len(gain), 1), 4)})
