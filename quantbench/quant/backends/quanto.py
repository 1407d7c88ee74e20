"""optimum-quanto backend (`quanto`): what it honours, anything else is rejected before any work:
  weights: int8 symmetric per channel (qint8), int4/int2 asymmetric in groups (qint4/qint2, affine
           with a float shift; the group size is the plan's: quanto's own choice would be 96 on
           576-wide inputs), or fp8 e4m3 per channel (qfloat8);
  activations: none, or 8-bit (int or fp8) per-tensor static, calibrated on the calibration
           batches with quanto's Calibration context.
Runs on CPU and CUDA (W8A8 on CPU is slow: an unfused int8 path).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ...modeling.surgery import run_batches
from ..plan import Plan
from ..plugin import Backend, BackendUnavailable, QuantContext
from ..spec import BACKENDS, QuantSpec
from ._common import reattach_online


def _weight_reason(w: QuantSpec | None) -> str | None:
    if w is None:
        return "quanto needs weights (int8 per channel, int4/int2 groups, or fp8)"
    if w.format == "fp8":
        return None if w.granularity == "channel" else "quanto stores fp8 weights per channel"
    if w.bits == 8:
        return None if (w.symmetric and w.granularity == "channel") else "quanto stores int8 weights symmetric per channel"
    if w.bits in (4, 2):
        return None if (not w.symmetric and w.granularity == "group") else \
            f"quanto stores int{w.bits} weights asymmetric (affine) in groups: symmetric false, granularity group"
    return f"quanto stores 8, 4 or 2-bit weights, not {w.bits}"


@BACKENDS.register("quanto")
class Quanto(Backend):
    name = "quanto"

    def supports(self, plan: Plan, names: list[str]) -> str | None:
        for n in names:
            lp = plan.linears[n]
            reason = _weight_reason(lp.weights)
            if reason is None and lp.activations is not None:
                a = lp.activations
                if a.bits != 8 or a.granularity != "tensor" or a.dynamic:
                    reason = "quanto quantizes activations as 8-bit per-tensor static (dynamic false) only"
            if reason is None and lp.kv is not None:
                reason = "kv quantization is simulated only"
            if reason:
                return f"{n}: {reason}"
        if len({(plan.linears[n].weights, plan.linears[n].activations) for n in names}) > 1:
            return "quanto quantizes every included linear the same way: use one weights/activations spec for all"
        return None

    @torch.no_grad()
    def apply(self, model: nn.Module, plan: Plan, names: list[str], ctx: QuantContext, opts) -> nn.Module:
        try:
            import optimum.quanto as oq
        except Exception as e:
            raise BackendUnavailable(f"optimum-quanto cannot be imported: {e}") from None
        lp = plan.linears[names[0]]
        w, a = lp.weights, lp.activations
        wt = oq.qfloat8_e4m3fn if w.format == "fp8" else {8: oq.qint8, 4: oq.qint4, 2: oq.qint2}[w.bits]
        at = None if a is None else (oq.qfloat8_e4m3fn if a.format == "fp8" else oq.qint8)
        old = {n: model.get_submodule(n) for n in names}
        oq.quantize(model, weights=wt, activations=at, include=names)
        for n, mod in old.items():
            reattach_online(mod, model.get_submodule(n))
        if w.granularity == "group":
            for n in names:
                m = model.get_submodule(n)
                if hasattr(m, "weight_group_size"):
                    m.weight_group_size = w.group_size
        if at is not None:
            with oq.Calibration():
                run_batches(model, ctx.calib.batches, ctx.batch_size, ctx.device)
        oq.freeze(model)
        return model
