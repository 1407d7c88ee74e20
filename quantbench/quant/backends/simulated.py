"""The simulated backend: every planned linear becomes a QuantLinear (weights on the plan's grid,
fake-quantized input activations, fake-quantized k/v outputs); static activation ranges are
calibrated on the calibration batches after all mitigations (kept channels/tokens excluded), and so
are NVFP4's activation global scales."""
from __future__ import annotations

import torch.nn as nn

from ...modeling.moe import borrow_static_ranges
from ...modeling.surgery import replace_module, run_batches
from ..plan import Plan
from ..plugin import Backend, QuantContext
from ..kvcache import attach_kv_cache
from ..qlinear import QuantLinear
from ..spec import BACKENDS
from ._common import reattach_online


@BACKENDS.register("simulated")
class Simulated(Backend):
    name = "simulated"
    real = False

    def apply(self, model: nn.Module, plan: Plan, names: list[str], ctx: QuantContext, opts) -> nn.Module:
        eff = ctx.effects
        qlinears = []
        for name in names:
            old = model.get_submodule(name)
            q = QuantLinear(old, plan.linears[name], eff.final_weights.get(name), eff.keep.get(name))
            if not ctx.keep_stored:  # a sweep: the codes go as soon as the dequantized weight exists
                q.release_stored()
                eff.final_weights.pop(name, None)
            replace_module(model, name, q)
            reattach_online(old, q)
            qlinears.append(q)
        static = [q for q in qlinears if q.aspec is not None and q.aspec.calibrated]  # nvfp4: its global scale
        r = plan.recipe
        kvq = attach_kv_cache(model, r.kv, r.name) if r.kv is not None and r.kv_at == "cache" else None
        static_kv = kvq is not None and not kvq.spec.dynamic
        if static or static_kv:
            for q in static:
                q.calibrating = True
            if static_kv:
                kvq.set_calibrating(True)  # post-RoPE K and V ranges, over the same calibration pass
            run_batches(model, ctx.calib.batches, ctx.batch_size, ctx.device)
            borrowed = borrow_static_ranges({q.name: q for q in static})  # MoE experts no token reached
            if borrowed:
                ctx.effects.notes["static_ranges_borrowed"] = len(borrowed)
        for q in qlinears:
            q.freeze()
        if kvq is not None:
            kvq.freeze()
        return model
