"""LLM.int8()-style mixed-precision decomposition (Dettmers et al. 2022), simulated.

Input channels carrying outliers stay in high precision; every other channel is quantized by the
plan's activation quantizer, with ranges computed without the outlier channels. As in
bitsandbytes, the weights stay quantized (its fp16 outlier matmul uses dequantized int8 weights).

Options:
  threshold: |x| above which a channel is kept (default 6.0, LLM.int8's value).
  mode: "dynamic" (default; per batch, any token above the threshold, as LLM.int8 does) or
        "static" (channels whose calibrated max |x| exceeds the threshold; fixed after calibration).
  calib_samples: calibration sequences for mode static (default 8).
The real kernel is the `bnb-int8` backend (bitsandbytes Linear8bitLt, threshold in backend_options).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
from pydantic import Field

from ..calibration import StatsRequest
from ..effects import Effects
from ..plugin import Mitigation, Options, QuantContext
from ..spec import MITIGATIONS


@dataclass
class KeepChannels:
    """Input channels kept in high precision: a fixed set (`cols`, bool [in]) and/or, per call,
    every channel whose |x| exceeds `threshold` anywhere in the batch."""

    cols: torch.Tensor | None = None
    threshold: float | None = None
    kind: str = "channels"

    def mask(self, x: torch.Tensor) -> torch.Tensor | None:
        cols = self.cols.to(x.device) if self.cols is not None else None
        if self.threshold is not None:
            dyn = x.detach().abs().reshape(-1, x.shape[-1]).amax(0) > self.threshold  # [in]
            cols = dyn if cols is None else cols | dyn
        return cols

    def side_bits(self) -> float:
        """A static channel set is stored as a bitmask over the input; a threshold as one fp16 value."""
        return float(self.cols.numel()) if self.cols is not None else 16.0


@MITIGATIONS.register("int8_decomp")
class Int8Decomp(Mitigation):
    name = "int8_decomp"
    needs = ("activations",)
    changes_weights = False

    class Options(Options):
        threshold: float = Field(6.0, gt=0)
        mode: Literal["dynamic", "static"] = "dynamic"
        calib_samples: int = Field(8, ge=1)

    def calibrate(self, model: nn.Module, ctx: QuantContext, opts: Options) -> dict[str, torch.Tensor] | None:
        if opts.mode == "dynamic":
            return None
        mods = {n: model.get_submodule(n) for n, lp in ctx.plan.linears.items() if lp.activations is not None}
        stats = ctx.calib.input_stats(model, mods, ctx.upstream, StatsRequest(samples=opts.calib_samples))
        return {k: v.absmax > opts.threshold for k, v in stats.items()}

    def apply(self, model: nn.Module, stats: dict[str, torch.Tensor] | None, ctx: QuantContext, opts: Options) -> Effects:
        eff = Effects(notes={"int8_decomp_threshold": opts.threshold})
        for name, lp in ctx.plan.linears.items():
            if lp.activations is None:
                continue
            if stats is None:
                eff.keep[name] = [KeepChannels(threshold=opts.threshold)]
            elif name in stats and stats[name].any():
                eff.keep[name] = [KeepChannels(cols=stats[name])]
        if stats:
            kept = sum(int(c.sum()) for c in stats.values())
            eff.notes["int8_decomp_kept_pct"] = round(100 * kept / max(sum(c.numel() for c in stats.values()), 1), 3)
        return eff
