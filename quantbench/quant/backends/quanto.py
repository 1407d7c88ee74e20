"""optimum-quanto backend (`quanto`): weights qint8 (per channel), qint4/qint2 (group-wise, affine)
or qfloat8 e4m3; optional activations qint8/qfloat8 (static per-tensor, calibrated on the
calibration batches with quanto's Calibration context).

The recipe's specs choose the types: weights.bits 8/4/2 (format fp8 -> qfloat8), activations
None or 8 bits. Quanto picks its own int4 group size (128, lowered by 32 until it divides the
input: 96 on the default model's 576-wide inputs); we override it with the recipe's group_size
so simulated and real rows compare the same grid. Runs on CPU and CUDA.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ...errors import QuantbenchError
from ..apply import run_batches, target_linears
from . import BackendUnavailable, register
from ._common import weight_bytes


def _types(oq, recipe) -> tuple:
    w, a = recipe.weights, recipe.activations
    if w is None:
        raise QuantbenchError(f"recipe '{recipe.name}': backend quanto needs weights (bits 8, 4 or 2, or fp8)")
    wt = oq.qfloat8_e4m3fn if w.format == "fp8" else {8: oq.qint8, 4: oq.qint4, 2: oq.qint2}.get(w.bits)
    if wt is None:
        raise QuantbenchError(f"recipe '{recipe.name}': quanto stores 8, 4 or 2-bit weights, not {w.bits}")
    if a is not None and a.bits != 8:
        raise QuantbenchError(f"recipe '{recipe.name}': quanto quantizes activations to 8 bits only")
    at = None if a is None else (oq.qfloat8_e4m3fn if a.format == "fp8" else oq.qint8)
    return wt, at


@torch.no_grad()
def quanto(model: nn.Module, recipe, ctx) -> nn.Module:
    try:
        import optimum.quanto as oq
    except Exception as e:
        raise BackendUnavailable(f"optimum-quanto cannot be imported: {e}") from None
    wt, at = _types(oq, recipe)
    before = weight_bytes(model)
    names = [n for n, _ in target_linears(model, recipe)]
    oq.quantize(model, weights=wt, activations=at, include=names)
    g = recipe.weights.group_size if recipe.weights.granularity == "group" else None
    for n in names:
        m = model.get_submodule(n)
        if g is not None and hasattr(m, "weight_group_size") and recipe.weights.bits < 8:
            m.weight_group_size = g
    if at is not None:
        with oq.Calibration():
            run_batches(model, ctx.calib, ctx.batch_size, ctx.device)
    oq.freeze(model)
    ctx.notes.update(measured_weight_bytes_fp=before, measured_weight_bytes=weight_bytes(model), quanto_group_size=g)
    return model


register("quanto", quanto)
