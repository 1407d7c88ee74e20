"""Per-linear sensitivity: the estimated damage of quantizing ONE linear alone to each option.

Score of linear l under option o (a Fisher / diagonal-Hessian estimate, as in ModelOpt's
auto_quantize and Optimal Brain Surgeon's output form):

    s(l, o) = 1/(2N) * sum_t sum_j g_tj^2 * (y^o_tj - y_tj)^2

with y the FP output of l on calibration token t, y^o the output of l simulated under option o
(the same QuantLinear the pipeline runs: weights on the option's grid, static activation ranges from
the calibration set's max |x|), g = d(sum of next-token NLL)/dy on the FP model (one backward pass
per sequence), N the scored tokens. It estimates the increase of the mean NLL (nats). An option the linear cannot
take (a group size not dividing its input) scores and costs UNAVAILABLE (inf). Bits per
option are measured like quant/size.py measures a simulated linear (QuantLinear.storage_bits, 16 bits
per element for a linear left in full precision); `rest_bits` is every other tensor of the model.

A base recipe with mitigations is measured on the mitigated model: its mitigations up to the first
that finalizes weights (e.g. rotate, smoothquant; not gptq) are applied to a copy first, so the
inputs, ranges and gradients are those the quantizers will see. Keep policies are not modelled.
"""
from __future__ import annotations

import copy
import json
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.errors import QuantbenchError
from ..core.hooks import forward_hooks
from ..modeling.arch import arch_or_none
from ..modeling.surgery import as_linear, model_device
from ..quant.apply import mitigate, prepare
from ..quant.calibration import Calibration, StatsRequest
from ..quant.effects import Effects
from ..quant.plan import LinearPlan
from ..quant.plugin import QuantContext
from ..quant.qlinear import QuantLinear
from ..quant.size import measure_size
from ..quant.spec import MITIGATIONS, Recipe
from .options import Option, base_problem, options_for

UNAVAILABLE = float("inf")  # score and bits of an option a linear cannot take (Option.fits)


@dataclass
class Sensitivity:
    base: str  # the base recipe's name
    options: list[str]  # option labels; 0 = base
    score: dict[str, list[float]]  # linear -> estimated increase of mean NLL (nats) per option
    bits: dict[str, list[float]]  # linear -> measured bits per option
    rest_bits: float  # every tensor that is not one of these linears (16 bits per element, tied once)
    n_params: int  # parameters of the FP model as loaded (the bits/weight denominator)
    tokens: int = 0
    seconds: float = 0.0
    validation: dict = field(default_factory=dict)

    @property
    def linears(self) -> list[str]:
        return list(self.score)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "Sensitivity":
        return cls(**d)

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1)


def _qlinear(name: str, lin: nn.Module, opt: Option, absmax: torch.Tensor | None) -> QuantLinear:
    q = QuantLinear(lin, LinearPlan(name, opt.weights, opt.activations, None, "simulated"))
    a = opt.activations
    if a is not None and a.calibrated:  # static ranges, or nvfp4's global scale (it depends on the absmax only)
        if absmax is None:
            raise QuantbenchError(f"{name}: static activations need calibration statistics")
        q._observe(torch.stack([-absmax, absmax]).to(lin.weight.dtype))  # [2, D]: the calibrated range
        q.freeze()
    return q


def option_bits(name: str, lin: nn.Module, opt: Option, absmax: torch.Tensor | None) -> float:
    """Bits of `lin` stored under `opt`, as quant/size.py counts them."""
    if opt.weights is None and opt.activations is None:
        l = as_linear(lin)
        return 16.0 * (l.weight.numel() + (l.bias.numel() if l.bias is not None else 0))
    return _qlinear(name, lin, opt, absmax).storage_bits()


@contextmanager
def _capture(model: nn.Module, mods: dict[str, nn.Module], subst: dict[str, QuantLinear] | None = None):
    """Record every linear's input and the gradient at its output; params frozen, graph from the embeddings.
    subst: linears whose output is replaced by that QuantLinear's (the model runs quantized there)."""
    xs: dict[str, torch.Tensor] = {}
    gs: dict[str, torch.Tensor] = {}
    flags = {p: p.requires_grad for p in model.parameters()}
    subst = subst or {}

    def fwd(name):
        def hook(_m, args, out):
            xs[name] = args[0].detach().reshape(-1, args[0].shape[-1])  # [T, in]
            if name in subst:
                out = subst[name](args[0])  # weight-only: gradients flow through the dequantized weights
            if out.requires_grad:
                out.register_hook(lambda g: gs.__setitem__(name, g.detach().reshape(-1, g.shape[-1])))  # [T, out]
            return out
        return hook

    pairs = [(model.get_input_embeddings(), lambda _m, _a, o: o.requires_grad_(True))]
    pairs += [(m, fwd(n)) for n, m in mods.items()]
    try:
        for p in flags:
            p.requires_grad_(False)
        with forward_hooks(pairs):
            yield xs, gs
    finally:
        for p, f in flags.items():
            p.requires_grad_(f)


def linear_names(model: nn.Module, base: Recipe) -> list[str]:
    plan = prepare(model, base)
    return [n for n, lp in plan.linears.items() if lp.quantized]


def mitigated(model: nn.Module, base: Recipe, calib: Calibration) -> tuple[nn.Module, str]:
    """(model, calibration key of its state): a copy with the base's mitigations applied up to the first
    that finalizes weights; the model itself when there are none."""
    mits = []
    for m in base.mitigations:
        if MITIGATIONS.get(m.name).finalizes_weights:
            break
        mits.append(m)
    if not mits:
        return model, "fp"
    model = copy.deepcopy(model)
    r = base.model_copy(update={"mitigations": tuple(mits)})
    ctx = QuantContext(plan=prepare(model, r), calib=calib, arch=arch_or_none(model))
    mitigate(model, ctx)
    return model, ctx.upstream


def static_absmax(model: nn.Module, mods: dict[str, nn.Module], calib: Calibration, upstream: str,
                  opts: list[Option]) -> dict[str, torch.Tensor]:
    if not any(o.activations is not None and o.activations.calibrated for o in opts):
        return {}
    stats = calib.input_stats(model, mods, upstream, StatsRequest(samples=len(calib.batches)))
    return {n: s.absmax for n, s in stats.items()}


def measure_sensitivity(model: nn.Module, base: Recipe, calib: Calibration, samples: int = 4,
                        grid_block: int | None = None, around: dict[str, int] | None = None) -> Sensitivity:
    """Scores and bits of every option of every linear the base recipe quantizes (see module doc).
    grid_block: the block of a low-bit grid the checkpoint's weights already sit on (Option.fits).
    around: a plan (option per linear) to linearize around instead of the FP model: every linear runs
    quantized to its planned option while inputs and gradients are recorded, so each score is the damage
    of that linear's option given the others' quantization noise (weight-only bases)."""
    t0 = time.perf_counter()
    n_params = sum(p.numel() for p in model.parameters())  # of the FP model as loaded
    model, upstream = mitigated(model, base, calib)
    opts = options_for(base)
    names = linear_names(model, base)
    mods = {n: model.get_submodule(n) for n in names}
    absmax = static_absmax(model, mods, calib, upstream, opts)
    ids = calib.subset(samples)
    score = {n: [0.0] * len(opts) for n in names}
    n_tok = 0
    dev = model_device(model)
    avail = {n: [o.fits(as_linear(mods[n]).in_features, grid_block) for o in opts] for n in names}
    subst = {}
    if around:
        why = base_problem(base, refine=1)
        if why is not None:
            raise QuantbenchError(f"mixed: {why}")
        subst = {n: _qlinear(n, mods[n], opts[around[n]], None) for n in names
                 if opts[around[n]].weights is not None}
    with torch.enable_grad(), _capture(model, mods, subst) as (xs, gs):
        for i in range(len(ids)):
            seq = ids[i: i + 1].to(dev)  # [1, T]
            xs.clear(), gs.clear()
            out = model(input_ids=seq, labels=seq)
            (out.loss * (seq.shape[1] - 1)).backward()  # d(sum NLL)/dy at every linear output
            n_tok += seq.shape[1] - 1
            with torch.no_grad():
                for n in names:
                    x, g2 = xs[n], gs[n].float().pow(2)
                    lin = as_linear(mods[n])
                    y = F.linear(x, lin.weight, lin.bias)  # x is already through any online transform
                    for k, o in enumerate(opts):
                        if (o.weights is None and o.activations is None) or not avail[n][k]:
                            continue
                        e = _qlinear(n, mods[n], o, absmax.get(n))(x) - y  # [T, out]
                        score[n][k] += 0.5 * float((g2 * e.float().pow(2)).sum())
    score = {n: [s / max(n_tok, 1) if ok else UNAVAILABLE for s, ok in zip(v, avail[n])] for n, v in score.items()}
    bits = {n: [option_bits(n, mods[n], o, absmax.get(n)) if ok else UNAVAILABLE for o, ok in zip(opts, avail[n])]
            for n in names}
    fp_plan = prepare(model, Recipe(name="fp"))
    total_fp = measure_size(model, fp_plan, Effects(), n_params).total_bits
    rest = total_fp - sum(option_bits(n, mods[n], Option("fp", None, None), None) for n in names)
    return Sensitivity(base.name, [o.label for o in opts], score, bits, rest, n_params, n_tok,
                       round(time.perf_counter() - t0, 2))
