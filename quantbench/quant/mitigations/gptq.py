"""GPTQ (Frantar et al. 2023): quantize weights column by column, pushing each column's rounding
error onto the not-yet-quantized columns through the inverse Hessian H = XᵀX of the layer input.

`gptq_quantize` is the reference loop (IST-DASLab gptq `GPTQ.fasterquant`; AutoGPTQ's
`static_groups` variant with act_order), checked output channel by output channel with torch.equal
against a transcription in tests/test_gptq_reference.py:
  - dead inputs (diag H == 0): H[j, j] = 1 and W[:, j] = 0; damping percdamp * mean(diag H);
    H^-1 as Cholesky -> cholesky_inverse -> upper Cholesky factor U; column i's error / U[i, i];
  - lazy batches of `block` columns: in-block updates on a copy of the block, the block's error
    pushed onto the later columns at its end (groups may straddle blocks, as in the reference);
  - per-channel / per-tensor scales from the weights before dead columns are zeroed;
  - groups: a group's scale is fitted when its first column is reached, on the weight matrix as
    updated through the previous blocks (the reference reads W there, not the block copy W1, so a
    group starting inside a block does not see that block's earlier updates);
  - act_order: columns by descending diag H with static groups (every group fitted up front on the
    weights with dead columns zeroed, groups stay contiguous in the original order: no g_idx);
    `static_groups: true` does the same without act_order.
Intended differences from the reference:
  - H is accumulated as XᵀX in float64 (reference: 2/n XᵀX as a running mean in float32) and
    factored in float64; the column loop runs in float32 like the reference. In exact arithmetic
    GPTQ does not depend on a constant factor in H (damping is relative); in float32 the
    reference's factorisation moves a few codes (0-0.1 % of per-channel weights on the test layers).
  - token_norm (default true): each token's input row is scaled to unit RMS before H is accumulated
    (below). token_norm: false gives the reference Hessian.
  - the quantizer is ours (compressed-tensors' grid, quantbench.quant.primitives): signed codes,
    scale absmax / 7.5 at 4 bits, where the reference uses unsigned codes and (max - min) / 15.
  - llm-compressor (what ships to vLLM) fits every group's scale up front on the original weights
    (before dead columns are zeroed), with or without act_order ("weight" actorder is our act_order);
    `static_groups: true` is the closest setting (it fits after dead columns are zeroed).

Float formats (fp8, the microscaling nvfp4 / mxfp4 / mxfp8, fp8 128x128 blocks): the column quantizer is the
format's own quantize-dequantize (e4m3 or e2m1 rounding at the group's scale, compressed-tensors' arithmetic
from quantbench.quant.primitives), so every column lands on the grid the format stores and export writes.
  - nvfp4: the fp32 global scale is fixed up front from the weights GPTQ is given (448 * 6 / absmax, as
    llm-compressor's observer and MR-GPTQ take it), and every group scale is e4m3(global * absmax / 6) under it;
  - mx: each group's scale is the e8m0 power of two of its absmax;
  - 2-D blocks: a tile's scale is fitted when its first column is reached, over the tile's rows;
  - a group's scale is fitted when GPTQ reaches its first column (as for int groups), but on the weights as the
    error feedback has updated them by then: the in-block copy, and past the lazy block the pending updates
    applied (the reference reads W, stale inside a lazy block: 7 of 8 groups of 16 in a block of 128 would be
    fitted on weights that miss part of the feedback). int groups keep the reference's reading (checked bit for
    bit against it);
  - static_groups / act_order: every group fitted up front from the weights given, as MR-GPTQ (FP-Quant) and
    llm-compressor do; `mse` searches the shrunk absmax through the format's own scale function.
MR-GPTQ (Egiazarian et al. 2025) adds block-wise Hadamard rotations of the group size, fused into the weights and
applied online to the activations; quantbench's `rotate` is the whole-dimension (QuaRot) rotation only.

Calibration modes (option `sequential`):
  - parallel (sequential: false): every layer's Hessians from one pass over the model as it is
    before GPTQ (FP, or after the earlier mitigations), shared by q/k/v and gate/up, cached by the
    calibration stage across recipes.
  - sequential (true): layer by layer (quantbench.quant.sequential): each decoder layer's Hessians
    from inputs produced by the already-quantized layers before it, as reference GPTQ's llama.py
    and llm-compressor's sequential pipeline (without `true_sequential`: within a layer every linear
    sees that layer's FP weights); linears outside the decoder layers last, from one pass over the
    quantized model. Activation quantizers of the recipe are not applied while calibrating.
  The default is the one measured better on the default model (docs/quantization.md, "GPTQ").

Hessian: with token_norm each token's input row is scaled to unit RMS before H = XᵀX is accumulated
(a deliberate departure from reference GPTQ). On the default model the BOS token's massive
activations (~10^4x the median) otherwise dominate H, and GPTQ's error feedback then serves that
one token at the expense of all others (numbers in docs/quantization.md). More damping does not fix
the plain H; leaving the BOS token out of H (skip_first: 1) is worse still: its output must stay
accurate.

The result is a QTensor (codes, scales, zero points) declared as final in the Effects, so no backend
rounds it again (re-running RTN on GPTQ output would pick a different scale whenever an extreme
column value was moved by the updates); the dequantized weight is written back too.

Scale search (option `mse`, default false): the reference Quantizer's `mse=True` (QuaRot's `w_clip`):
every scale GPTQ fits (per group when the group starts, per channel, or up front) shrinks the block's
range by the p in {1, 0.99, ..., 0.21} minimising sum |Q(w) - w|^2.4 over the block. Unlike `clip`
before `gptq` (which clamps W, so GPTQ then reproduces the clamped weights), the error feedback
still targets the original W.

Options: damp (0.01, fraction of mean diag H), block (128), act_order (false), static_groups (false),
calib_samples (8), token_norm (true), skip_first (0), sequential (see SEQUENTIAL_DEFAULT), mse (false; slow:
every fit tries 80 ranges, ~0.1 s for one group of a [1536, 64] slice on one core here, about 10x plain
GPTQ per linear).
"""
from __future__ import annotations

import time

import torch
import torch.nn as nn
from pydantic import Field

from ...core.errors import QuantbenchError
from ...modeling.surgery import get_weight, set_weight
from ..calibration import StatsRequest, collect_input_stats
from ..effects import Effects
from ..plugin import Mitigation, Options, QuantContext
from ..primitives import (FP8_DTYPE, QTensor, block_range, compute_dtype, dequantize, qparams_from_range, quantize,
                          quantize_weight, spec_blocks, tensor_global_scale)
from ..sequential import LayerStep, decoder_layers, run_sequential
from ..spec import MITIGATIONS, QuantSpec
from .clip import block_qparams

SEQUENTIAL_DEFAULT = True  # decided by measurement on the default model: docs/quantization.md, "GPTQ"


def _fq_col(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec,
            gscale: torch.Tensor | None = None) -> torch.Tensor:
    """Fake-quantize one column w [out] with per-row scale/zero [out] (nvfp4: under the fp32 global scale):
    the format's own quantize-dequantize (int, e4m3, e2m1), element by element as on the whole weight."""
    q = quantize(w[:, None, None], scale[:, None, None], zero[:, None, None], spec, gscale)  # [out, 1, 1]
    return dequantize(q, scale[:, None, None], zero[:, None, None], torch.float32, gscale).reshape(-1)


def _inverse_hessian_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of H^-1 (after damping), as in reference GPTQ."""
    n = h.shape[0]
    h = h + damp * torch.diagonal(h).mean() * torch.eye(n, dtype=h.dtype)
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(hinv, upper=True)


def _channel_spec(spec: QuantSpec) -> QuantSpec:
    return spec.model_copy(update={"granularity": "channel", "group_size": None})


MSE_SHRINK, MSE_GRID, MSE_NORM = 0.8, 100, 2.4  # the reference Quantizer's mse search (maxshrink, grid, norm)


def _fit(w: torch.Tensor, spec: QuantSpec, mse: bool = False, gscale: torch.Tensor | None = None
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) of w [out, cols] on spec's grid: [out, G] (group), [out, 1] (channel), [1, 1] (tensor),
    [ceil(out / g), ceil(cols / g)] (2-D blocks). Microscaling formats: the format's own scale (nvfp4: e4m3
    under the fp32 global scale `gscale`; mx: e8m0 power of two) of each block's absmax.

    mse: the reference Quantizer's `mse=True` (QuaRot's w_clip): each block's range shrunk by
    p = 1 - i/100 (i < 80), the p minimising sum |Q(w) - w|^2.4 over the block kept. On a microscaling
    format the shrunk absmax goes through the format's scale function, so every candidate is a scale
    the format can store (mx: the few powers of two below the absmax's; nvfp4: e4m3 values)."""
    if not mse:
        return block_qparams(w, spec, global_scale=gscale)
    wb = spec_blocks(w.float(), spec)  # [R, G, B]
    lo, hi = block_range(wb, spec)  # [R, G, 1]
    p = 1 - torch.arange(int(MSE_SHRINK * MSE_GRID), dtype=torch.float64) / MSE_GRID  # as the reference's 1 - i / grid
    p = p.float()[:, None, None, None]  # [P, 1, 1, 1]
    s, z = qparams_from_range(lo * p, hi * p, spec, gscale)  # [P, R, G, 1], all shrink factors at once
    dq = dequantize(quantize(wb, s, z, spec, gscale), s, z, torch.float32, gscale)  # [P, R, G, B]
    e = (dq - wb).abs().pow(MSE_NORM).sum(-1)  # [P, R, G]
    best = e.argmin(0, keepdim=True)  # the first minimum, as the reference's strict < over increasing i
    best_s = s[..., 0].gather(0, best)[0]
    z = z[..., 0]
    best_z = z.view(torch.uint8).gather(0, best)[0].view(z.dtype) if z.dtype == FP8_DTYPE else z.gather(0, best)[0]
    return best_s, best_z


def _col_params(t: torch.Tensor, j: int, n_out: int, spec: QuantSpec) -> torch.Tensor:
    """Scale (or zero) column j of t [R, G] per output row [n_out]: rows of a 2-D block share their tile's."""
    if spec.granularity == "block":
        return t[:, j].repeat_interleave(spec.group_size)[:n_out]
    return t.expand(n_out, -1)[:, j]


def _current(w: torch.Tensor, w1: torch.Tensor, err: torch.Tensor, u: torch.Tensor, i: int, i1: int, i2: int,
             g: int) -> torch.Tensor:
    """Columns i .. i + g of the weight as the error feedback has made them when column i is reached: the block
    copy w1 (in-block updates) and, for columns past the lazy block, w with this block's pending updates applied."""
    hi = min(i + g, w.shape[1])
    cur = w1[:, i - i1: min(hi, i2) - i1]
    if hi > i2:
        rest = w[:, i2:hi] - err[:, : i - i1] @ u[i1:i, i2:hi]
        cur = torch.cat([cur, rest], 1)
    return cur


@torch.no_grad()
def gptq_quantize(w: torch.Tensor, h: torch.Tensor, spec: QuantSpec, damp: float = 0.01, block: int = 128,
                  act_order: bool = False, static_groups: bool = False, mse: bool = False) -> QTensor:
    """w [out, in], h = XᵀX [in, in] -> the quantized weight (codes, scales, zeros) on spec's grid.

    The reference loop (IST-DASLab GPTQ.fasterquant; AutoGPTQ's static_groups with act_order), see the
    module doc. tests/test_gptq_reference.py checks it against a transcription, output channel by
    output channel, with torch.equal. Microscaling formats and 2-D blocks: module doc, "Float formats"."""
    gscale = tensor_global_scale(w.to(compute_dtype(w.dtype)), spec)  # nvfp4: fixed from the weights given
    w = w.float().clone()
    h = h.double().clone()
    n_out, n = w.shape
    g = spec.group_size if spec.granularity in ("group", "block") else None
    fresh = spec.micro or spec.granularity == "block"  # groups fitted on the weights as updated (module doc)
    static = g is not None and (act_order or static_groups)
    if g is None:  # with groups the reference's whole-row fit here is overwritten below: skipped (mse made it slow)
        sc, ze = _fit(w, spec, mse)  # before dead columns are zeroed, as the reference
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    if static:
        sc, ze = _fit(w, spec, mse, gscale)  # every group up front, from the weights with dead columns zeroed  [R, G]
    elif g is not None:
        rows = -(-n_out // g) if spec.granularity == "block" else n_out
        sc, ze = torch.zeros(rows, -(-n // g)), torch.zeros(rows, -(-n // g))  # filled when each group starts
    perm = torch.argsort(torch.diagonal(h), descending=True) if act_order else torch.arange(n)
    w, h = w[:, perm], h[perm][:, perm]
    u = _inverse_hessian_factor(h, damp).float()
    wq = torch.zeros_like(w)
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        w1 = w[:, i1:i2].clone()  # this block, with the in-block updates
        err = torch.zeros(n_out, i2 - i1)
        for i in range(i1, i2):
            if g is not None and not static and i % g == 0:
                if fresh:  # on the weights as the error feedback has updated them so far
                    s_new, z_new = _fit(_current(w, w1, err, u, i, i1, i2, g), spec, mse, gscale)  # [R, 1]
                else:  # fitted on w: updated through the previous blocks only, as the reference reads it
                    s_new, z_new = _fit(w[:, i: i + g], _channel_spec(spec), mse)  # [out, 1]
                sc[:, i // g], ze[:, i // g] = s_new[:, 0], z_new[:, 0]
            j = (int(perm[i]) if static else i) // g if g is not None else 0  # the column's scale index
            s, z = _col_params(sc, j, n_out, spec), _col_params(ze, j, n_out, spec)  # [out]
            col = w1[:, i - i1]
            q = _fq_col(col, s, z, spec, gscale)
            e = (col - q) / u[i, i]
            wq[:, i] = q
            w1[:, i - i1:] -= e[:, None] * u[i, i:i2][None, :]
            err[:, i - i1] = e
        w[:, i2:] -= err @ u[i1:i2, i2:]
    wq = wq[:, torch.argsort(perm)]  # [out, in] on the grid, original column order
    return quantize_weight(wq, spec, sc, ze, gscale)


@MITIGATIONS.register("gptq")
class GPTQ(Mitigation):
    name = "gptq"
    needs = ("weights",)
    finalizes_weights = True

    class Options(Options):
        damp: float = Field(0.01, gt=0)
        block: int = Field(128, ge=1)
        act_order: bool = False
        static_groups: bool = False
        calib_samples: int = Field(8, ge=1)
        token_norm: bool = True
        skip_first: int = Field(0, ge=0)
        sequential: bool = SEQUENTIAL_DEFAULT
        mse: bool = False

    def check(self, model: nn.Module, plan, opts: Options) -> None:
        super().check(model, plan, opts)
        if opts.sequential:
            try:
                decoder_layers(model)
            except QuantbenchError as e:
                raise QuantbenchError(f"recipe '{plan.recipe.name}': gptq: {e}; or set sequential: false "
                                      "(Hessians from one pass over the model)") from None

    def _request(self, opts: Options) -> StatsRequest:
        return StatsRequest(samples=opts.calib_samples, gram=True, token_norm=opts.token_norm,
                            skip_first=opts.skip_first)

    def calibrate(self, model: nn.Module, ctx: QuantContext, opts: Options) -> dict[str, torch.Tensor] | None:
        if opts.sequential:
            return None  # Hessians come from the layer-by-layer run in apply (they depend on this recipe)
        mods = {n: model.get_submodule(n) for n in ctx.plan.weight_specs()}
        stats = ctx.calib.input_stats(model, mods, ctx.upstream, self._request(opts))
        return {k: v.gram for k, v in stats.items()}

    @torch.no_grad()
    def apply(self, model: nn.Module, stats: dict[str, torch.Tensor] | None, ctx: QuantContext,
              opts: Options) -> Effects:
        specs = ctx.plan.weight_specs()
        if opts.sequential:
            final = self._sequential(model, ctx, opts)
        else:
            final = {name: self._quantize(model.get_submodule(name), stats[name], spec, opts)
                     for name, spec in specs.items() if name in stats}  # never called: left to the backend's RTN
        return Effects(final_weights=final, notes={"gptq_layers": len(final), "gptq_sequential": opts.sequential})

    def _quantize(self, mod: nn.Module, h: torch.Tensor, spec: QuantSpec, opts: Options) -> QTensor:
        qt = gptq_quantize(get_weight(mod), h, spec, opts.damp, opts.block, opts.act_order, opts.static_groups,
                           opts.mse)
        set_weight(mod, qt.dequantize())
        return qt

    def _sequential(self, model: nn.Module, ctx: QuantContext, opts: Options) -> dict[str, QTensor]:
        """Layer by layer: Hessians of a layer's linears from inputs made by the already-quantized
        layers before it; linears outside the decoder layers (e.g. an lm_head left in the plan) last,
        from one pass over the quantized model."""
        specs, final, req = ctx.plan.weight_specs(), {}, self._request(opts)
        batches = ctx.calib.subset(opts.calib_samples)
        stats_s = [0.0]

        def on_layer(step: LayerStep) -> None:
            mods = {n: model.get_submodule(n) for n in specs if step.owns(n)}
            t0 = time.perf_counter()
            grams = step.input_stats(mods, req) if mods else {}
            stats_s[0] += time.perf_counter() - t0
            for name, g in grams.items():
                final[name] = self._quantize(mods[name], g.gram, specs[name], opts)

        run_sequential(model, batches, ctx.batch_size, ctx.device, on_layer)
        ctx.calib.ledger.append((f"sequential Hessians ({len(final)} linears)", stats_s[0], False))
        path, _ = decoder_layers(model)
        rest = {n: model.get_submodule(n) for n in specs if not n.startswith(path + ".")}
        if rest:
            for name, g in collect_input_stats(model, rest, batches, ctx.batch_size, ctx.device, req).items():
                final[name] = self._quantize(rest[name], g.gram, specs[name], opts)
        return final
