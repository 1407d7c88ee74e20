"""LLM.int8()-style mixed-precision decomposition (Dettmers et al. 2022), simulated.

Input channels carrying outliers stay in high precision; every other channel is quantized by the
recipe's activation quantizer, with ranges computed without the outlier channels. As in
bitsandbytes, the weights stay quantized (its fp16 outlier matmul uses dequantized int8 weights).

Options:
  threshold: |x| above which a channel is kept (default 6.0, LLM.int8's value).
  mode: "dynamic" (default; per batch, any token above the threshold, as LLM.int8 does) or
        "static" (channels whose calibrated max |x| exceeds the threshold; fixed after calibration).
  calib_samples: calibration sequences for mode static (default 8).
The real kernel is the `bnb-int8` backend (bitsandbytes Linear8bitLt, threshold in backend_options).
"""
from __future__ import annotations

import sys
from typing import Any

import torch
import torch.nn as nn

from ...errors import QuantbenchError
from ..apply import target_linears
from . import register
from ._util import calib_subset, input_stats, require


def check(model: nn.Module, recipe) -> None:
    require(recipe, "activations", "int8_decomp")


def calibrate(model: nn.Module, batches: torch.Tensor, opts: dict[str, Any], ctx) -> dict:
    check(model, ctx.recipe)
    mode, thr = opts.get("mode", "dynamic"), float(opts.get("threshold", 6.0))
    if mode not in ("dynamic", "static"):
        raise QuantbenchError(f"int8_decomp: mode must be 'dynamic' or 'static', got {mode!r}")
    if mode == "dynamic":
        return {"mode": mode, "threshold": thr}
    stats = input_stats(model, dict(target_linears(model, ctx.recipe)), calib_subset(batches, opts, 8), ctx)
    return {"mode": mode, "threshold": thr, "cols": {k: v["absmax"] > thr for k, v in stats.items()}}


def apply(model: nn.Module, stats: dict, opts: dict[str, Any], ctx) -> nn.Module:
    thr, cols = stats["threshold"], stats.get("cols")

    def configure(name: str, q) -> None:
        if cols is None:
            q.fp_threshold = thr
        elif name in cols and cols[name].any():
            q.fp_cols = cols[name]

    ctx.configure.append(configure)
    ctx.notes["int8_decomp_threshold"] = thr
    if cols:
        kept = sum(int(c.sum()) for c in cols.values())
        ctx.notes["int8_decomp_kept_pct"] = round(100 * kept / max(sum(c.numel() for c in cols.values()), 1), 3)
    return model


register("int8_decomp", sys.modules[__name__])
