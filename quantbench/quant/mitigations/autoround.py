"""AutoRound / SignRound (Cheng et al. 2023, Intel's `auto-round`): signed-gradient rounding and min-max
tuning, decoder block by decoder block.

For every weight W of a decoder layer, on the recipe's own grid (quant/primitives.py, compressed-tensors'
formulas), learn

    V in [-0.5, 0.5]      one rounding offset per weight, in code units:  codes = round(W / s + z + V)
    alpha, beta in [0.5, 1]  per weight block (row / group / tensor): the block's range is clipped to
                          (beta * min, alpha * max) before its scale (and zero point) are computed

by signed gradient descent (SignSGD: p <- p - lr_t * sign(grad), lr_t = lr * (1 - t / iters), lr = 1 / iters,
as auto-round) on the block output error

    L = mean((layer_Q(X_q) - layer(X_fp))^2)

where layer_Q is the layer with every weight replaced by its fake-quantized value (rounding and the scale's
own roundings through a straight-through estimator), X_q the layer's inputs produced by the already
quantized layers before it (quant/sequential.py, as auto-round's `enable_quanted_input`) and layer(X_fp) the
FP layer on the FP inputs (tracked alongside). One step takes one batch of `batch_size` calibration
sequences (the batches are visited in a shuffled order, reshuffled every pass). As auto-round, the iterate
with the lowest batch loss is kept (`best`), and V = 0, alpha = beta = 1 is exactly round-to-nearest (the
same floats as the backend's RTN, tests/test_autoround.py).

The result is a QTensor per linear (codes, the tuned scales / zero points, NVFP4's global scale) declared
final like GPTQ's, and the layer's weights are set to its dequantized values before the next layer's
inputs are computed.

Formats: int (symmetric: two factors on |min| and max as auto-round's int_sym, the scale from the larger;
asymmetric: both ends and the zero point), nvfp4 and mxfp4 (one factor on the block's absmax, V added in
e2m1 units before the e2m1 rounding, as auto-round's nv_fp4 / mx_fp4; the fp8 block scale of NVFP4 and the
power-of-two MX scale through straight-through estimators; NVFP4's global scale stays the weight's own).
fp8 / mxfp8 weights and 2-D blocks are refused.

Differences from auto-round 0.16.1 (checked on a tiny Llama in tests/test_autoround.py and the notes of
docs/quantization.md): the grid is ours (compressed-tensors': symmetric int scale absmax / 7.5 at 4 bits,
auto-round's int_sym uses absmax / 8 with a signed scale; the asymmetric grid is the same up to the code
offset 8); batches are fixed groups of calibration sequences (auto-round samples indices); no loss mask on
the last token; factors clamped to [0.5, 1] (auto-round clamps to [0, 1]; its lr schedule cannot leave
[0.5, 1] either) and V to [-0.5, 0.5] (unclamped there, same reachable range).

Options: iters (see ITERS_DEFAULT), lr (1 / iters), minmax_lr (lr), minmax (true: tune alpha/beta; false:
rounding only), batch_size (see BATCH_DEFAULT), calib_samples (16), quanted_input (true), best (true), seed (0),
token_norm (false: auto-round's plain MSE; true: each token's squared error divided by the mean square of its FP
output, so that a token with massive activations, the default model's BOS from layer 11 on, does not own the loss:
there it holds 97 % of round-to-nearest's block output error).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from pydantic import Field

from ...core.errors import QuantbenchError
from ...core.hooks import first_tensor
from ...modeling.surgery import get_weight, is_conv1d, set_weight
from ..effects import Effects
from ..microscaling import FP4_MAX, FP8_DTYPE, FP8_MAX, NVFP4_SCALE_EPS, cast_to_fp4, mx_scale
from ..plugin import Mitigation, Options, QuantContext
from ..primitives import QTensor, block_range, code_range, spec_blocks, tensor_global_scale
from ..sequential import LayerStep, decoder_layers, run_sequential
from ..spec import MITIGATIONS, QuantSpec

ITERS_DEFAULT = 50  # auto-round: 200 (50 in its "light" recipe); 50 x 30 layers of the default model take minutes on CPU
BATCH_DEFAULT = 2  # sequences per step (auto-round: 8 x 2048 tokens); one step of the default model's layer on 2 x 256
                   # tokens is about 1 s on 2 shared CPU cores
FACTOR_RANGE = (0.5, 1.0)  # alpha, beta
V_RANGE = (-0.5, 0.5)


def _ste(x: torch.Tensor, hard: torch.Tensor) -> torch.Tensor:
    """hard in the forward pass (exactly: hard + 0), the identity's gradient in the backward pass."""
    return hard.detach() + (x - x.detach())


class Rounder:
    """One weight [out, in] on spec's grid, with learnable rounding offsets V [R, G, B] and range factors
    alpha, beta [R, G]. qdq(...) is differentiable (straight-through estimators); with V = 0 and
    alpha = beta = 1 it is the backend's round-to-nearest float for float."""

    def __init__(self, w: torch.Tensor, spec: QuantSpec):
        self.spec, self.shape = spec, w.shape
        wc = w.float()
        self.wb = spec_blocks(wc, spec)  # [R, G, B]
        lo, hi = block_range(self.wb, spec)  # [R, G, 1], clip_ratio applied as the backend does
        self.lo, self.hi = torch.min(lo, torch.zeros_like(lo)), torch.max(hi, torch.zeros_like(hi))
        self.gscale = tensor_global_scale(wc, spec)  # nvfp4: the weight's own fp32 global scale, fixed
        self.qmin, self.qmax = code_range(spec)
        self.half_span = torch.tensor(self.qmax - self.qmin, dtype=torch.float32) / 2  # as compressed-tensors
        self.span = torch.tensor(self.qmax - self.qmin, dtype=torch.float32)

    def params(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Initial (V, alpha, beta): round-to-nearest."""
        shape = self.wb.shape[:2]
        dev = self.wb.device
        return torch.zeros_like(self.wb), torch.ones(shape, device=dev), torch.ones(shape, device=dev)

    def qparams(self, alpha: torch.Tensor, beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(scale, zero, stored scale) [R, G, 1] from the clipped ranges, differentiable in alpha and beta;
        scale is what codes are multiplied by (NVFP4: the stored fp8 value / the global scale)."""
        spec = self.spec
        a = alpha[..., None]
        if spec.format == "int":
            lo, hi = self.lo * beta[..., None], self.hi * a
            if spec.symmetric:
                scale = torch.maximum(lo.abs(), hi.abs()) / self.half_span
                zero = torch.zeros_like(scale)
            else:
                scale = (hi - lo) / self.span
                dead = scale == 0  # an all-zero block: compressed-tensors' 0/0 zero point is stored as 0
                zero = torch.clamp(self.qmin - lo / torch.where(dead, 1.0, scale), self.qmin, self.qmax)
                zero = torch.where(dead, 0.0, _ste(zero, torch.round(zero.detach())))  # stored as int8
            scale = torch.where(scale == 0, torch.finfo(scale.dtype).eps, scale)
            return scale, zero, scale
        absmax = torch.maximum(self.lo.abs(), self.hi.abs()) * a
        if spec.format == "nvfp4":  # nvfp4_scale: fp8(global * absmax / 6) under the global scale
            s = self.gscale * (absmax / (torch.tensor(2 * FP4_MAX) / 2))
            s = torch.clamp(s, -FP8_MAX, FP8_MAX)
            s = _ste(s, s.detach().to(FP8_DTYPE).to(s.dtype))
            s = torch.where(s == 0, torch.tensor(NVFP4_SCALE_EPS), s)
            return s / self.gscale, torch.zeros_like(s), s
        if spec.format == "mxfp4":  # 2^(e8m0 exponent - 127); the surrogate absmax / 2^offset for the gradient
            hard = mx_scale(absmax.detach(), spec.bits)
            scale = _ste(absmax / 4.0, hard)
            return scale, torch.zeros_like(hard), scale
        raise QuantbenchError(f"autoround: weights {spec.short()} are not supported")

    def _round(self, x: torch.Tensor) -> torch.Tensor:
        return cast_to_fp4(x) if self.spec.format in ("nvfp4", "mxfp4") else torch.round(x)

    def qdq(self, v: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        """The fake-quantized weight [out, in] (float32), differentiable in v, alpha, beta."""
        scale, zero, _ = self.qparams(alpha, beta)
        x = torch.clamp(self.wb / scale + zero + v, self.qmin, self.qmax)  # the order of primitives.quantize
        q = _ste(x, self._round(x.detach()))
        return ((q - zero) * scale).reshape(self.shape)

    @torch.no_grad()
    def qtensor(self, v: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> QTensor:
        """The stored form: codes, the tuned scales and zero points (NVFP4: the weight's global scale)."""
        spec = self.spec
        scale, zero, stored = self.qparams(alpha, beta)
        q = self._round(torch.clamp(self.wb / scale + zero + v, self.qmin, self.qmax))
        shape = (1,) if spec.granularity == "tensor" else tuple(scale.shape[:2])
        if spec.format == "int":
            codes, zp = q.to(torch.int8), zero.to(torch.int8)
        else:  # e2m1 values in float; the scale as the format stores it (nvfp4: fp8 values in fp32)
            codes = q
            zp = torch.zeros(scale.shape, dtype=FP8_DTYPE if spec.format == "nvfp4" else torch.uint8)
        return QTensor(codes.reshape(self.shape), stored.reshape(shape), zp.reshape(shape), spec, self.gscale)


@dataclass
class BlockResult:
    qtensors: dict[str, QTensor]  # by model-level linear name
    loss_rtn: float  # block output MSE over every calibration batch, round-to-nearest
    loss: float  # ... with the kept parameters
    best_iter: int


def _layout(mod: nn.Module, w: torch.Tensor) -> torch.Tensor:
    """An [out, in] weight in the module's own layout and dtype."""
    return (w.t() if is_conv1d(mod) else w).to(mod.weight.dtype)


def tune_block(layer: nn.Module, linears: dict[str, tuple[str, nn.Module, QuantSpec]], inputs: list[torch.Tensor],
               args: list[tuple], kwargs: list[dict], targets: list[torch.Tensor], iters: int, lr: float,
               minmax_lr: float, minmax: bool = True, best: bool = True, seed: int = 0,
               token_norm: bool = False) -> BlockResult:
    """SignRound on one decoder layer. linears: model-level name -> (parameter path of its weight inside
    `layer`, module, spec); inputs / args / kwargs / targets: per batch, the layer's inputs and the FP
    outputs to match. The layer's weights are set to the result (dequantized). token_norm: each token's squared
    error divided by the mean square of its FP output (relative errors; see the module doc)."""
    rounders = {n: Rounder(get_weight(m), spec) for n, (_, m, spec) in linears.items()}
    state = {n: [p.requires_grad_(j == 0 or minmax) for j, p in enumerate(r.params())] for n, r in rounders.items()}
    frozen = {k: p.detach() for k, p in layer.named_parameters()}
    weights = [1.0 / t.float().pow(2).mean(-1, keepdim=True).clamp_min(1e-12) if token_norm else None for t in targets]

    def forward(k: int) -> torch.Tensor:
        ws = {path: _layout(m, rounders[n].qdq(*state[n])) for n, (path, m, _) in linears.items()}
        out = torch.func.functional_call(layer, {**frozen, **ws}, (inputs[k], *args[k]), kwargs[k])
        err = (first_tensor(out).float() - targets[k].float()).pow(2)
        return (err * weights[k]).mean() if token_norm else err.mean()

    def total() -> float:
        with torch.no_grad():
            return sum(float(forward(k)) * inputs[k].shape[0] for k in range(len(inputs))) / sum(
                x.shape[0] for x in inputs)

    loss_rtn = total()
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    kept = (float("inf"), [[p.detach().clone() for p in ps] for ps in state.values()], -1)
    with torch.enable_grad():
        for i in range(iters):
            if not order:
                order = torch.randperm(len(inputs), generator=gen).tolist()
            loss = forward(order.pop())
            val = float(loss.detach())
            if best and val < kept[0]:
                kept = (val, [[p.detach().clone() for p in ps] for ps in state.values()], i)
            loss.backward()
            f = 1.0 - i / iters  # LinearLR(start 1, end 0, total_iters=iters), stepped after each iteration
            with torch.no_grad():
                for v, a, b in state.values():  # a None gradient: a factor the format does not use, an
                    for p, rate, bounds in ((v, lr, V_RANGE), (a, minmax_lr, FACTOR_RANGE), (b, minmax_lr, FACTOR_RANGE)):
                        if p.grad is not None:  # expert no token of this batch reached, minmax off
                            p.add_(torch.sign(p.grad), alpha=-rate * f).clamp_(*bounds)
                            p.grad = None
    if best and iters > 0:
        for ps, saved in zip(state.values(), kept[1]):
            for p, s in zip(ps, saved):
                p.data.copy_(s)
    for ps in state.values():
        for p in ps:
            p.requires_grad_(False)
    loss = total()
    out = {}
    with torch.no_grad():
        for n, (_, m, _) in linears.items():
            out[n] = rounders[n].qtensor(*state[n])
            set_weight(m, out[n].dequantize(torch.float32))
    return BlockResult(out, loss_rtn, loss, kept[2] if best else iters - 1)


@MITIGATIONS.register("autoround")
class AutoRound(Mitigation):
    name = "autoround"
    needs = ("weights",)
    finalizes_weights = True

    @classmethod
    def spec_issue(cls, weights: QuantSpec | None, activations: QuantSpec | None) -> str | None:
        if weights is not None and (weights.format not in ("int", "nvfp4", "mxfp4") or weights.granularity == "block"):
            return (f"weights {weights.short()} are not supported: the learnable quantizer covers int (tensor, "
                    "channel, group), nvfp4 and mxfp4")
        return None

    class Options(Options):
        iters: int = Field(ITERS_DEFAULT, ge=0)
        lr: float | None = Field(None, gt=0)  # None: 1 / iters (auto-round's default)
        minmax_lr: float | None = Field(None, gt=0)  # None: lr
        minmax: bool = True
        batch_size: int = Field(BATCH_DEFAULT, ge=1)
        calib_samples: int = Field(16, ge=1)
        quanted_input: bool = True
        best: bool = True
        seed: int = 0
        token_norm: bool = False

    def check(self, model: nn.Module, plan, opts: Options) -> None:
        super().check(model, plan, opts)
        try:
            decoder_layers(model)
        except QuantbenchError as e:
            raise QuantbenchError(f"recipe '{plan.recipe.name}': autoround: {e}") from None

    @torch.no_grad()
    def apply(self, model: nn.Module, stats, ctx: QuantContext, opts: Options) -> Effects:
        specs = ctx.plan.weight_specs()
        lr = opts.lr if opts.lr is not None else 1.0 / max(opts.iters, 1)
        minmax_lr = opts.minmax_lr if opts.minmax_lr is not None else lr
        batches = ctx.calib.subset(opts.calib_samples)
        final: dict[str, QTensor] = {}
        ratios: list[float] = []
        fp: list[torch.Tensor] = []

        def on_layer(step: LayerStep) -> None:
            args, kwargs = step.inputs.args[step.kind], step.inputs.kwargs[step.kind]
            if step.index == 0:
                fp[:] = list(step.inputs.hidden)
            fp_in = list(fp)
            fp[:] = [first_tensor(step.layer(h, *a, **k)) for h, a, k in zip(fp_in, args, kwargs)]  # FP layer
            params = dict(step.layer.named_parameters())
            linears = {}
            for n in specs:
                if step.owns(n) and f"{n[len(step.name) + 1:]}.weight" in params:
                    linears[n] = (f"{n[len(step.name) + 1:]}.weight", model.get_submodule(n), specs[n])
            if not linears:
                return
            inputs = list(step.inputs.hidden) if opts.quanted_input else fp_in
            res = tune_block(step.layer, linears, inputs, args, kwargs, fp, opts.iters, lr, minmax_lr,
                             opts.minmax, opts.best, opts.seed + step.index, opts.token_norm)
            final.update(res.qtensors)
            ratios.append(res.loss / max(res.loss_rtn, 1e-30))

        run_sequential(model, batches, opts.batch_size, ctx.device, on_layer)
        rest = sum(1 for n in specs if n not in final)  # outside the decoder layers: the backend's round-to-nearest
        return Effects(final_weights=final, notes={
            "autoround_layers": len(final),
            "autoround_err_vs_rtn": round(sum(ratios) / max(len(ratios), 1), 4),
            **({"autoround_rtn_linears": rest} if rest else {})})
