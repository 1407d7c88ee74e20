"""The simulated quantized linear: fake-quantized weights, fake-quantized input activations."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .primitives import block_range, blocks, fake_quant, qparams_from_range
from .spec import QuantSpec


def as_linear(module: nn.Module) -> nn.Linear:
    """nn.Linear as is; GPT-2's Conv1D (weight [in, out]) as an equivalent nn.Linear."""
    if isinstance(module, nn.Linear):
        return module
    w = module.weight.data.t().contiguous()  # Conv1D weight [in, out] -> [out, in]
    lin = nn.Linear(w.shape[1], w.shape[0], bias=module.bias is not None, device=w.device, dtype=w.dtype)
    lin.weight.data.copy_(w)
    if module.bias is not None:
        lin.bias.data.copy_(module.bias.data)
    return lin


class QuantLinear(nn.Module):
    """y = fq_a(x) @ fq_w(W)^T + b, simulated in the input dtype.

    Activation ranges are dynamic (per call) or static: `calibrating=True` records running
    min/max per block (over all tokens seen), `freeze()` turns them into fixed qparams.
    `token_keep` (a bool mask [B, T] set by outlier-token-aware handling) leaves those tokens'
    activations unquantized. `fp_cols` (bool [in], static) or `fp_threshold` (dynamic: columns whose
    |x| exceeds it anywhere in the batch) leave input channels unquantized, LLM.int8-style (the
    weights stay quantized, as in bitsandbytes). `ospec` fake-quantizes the output (KV cache).
    """

    def __init__(self, linear: nn.Module, wspec: QuantSpec | None, aspec: QuantSpec | None, name: str = ""):
        super().__init__()
        lin = as_linear(linear)
        self.name = name
        self.in_features, self.out_features = lin.in_features, lin.out_features
        self.wspec, self.aspec = wspec, aspec
        w = lin.weight.data
        self.weight = nn.Parameter(fake_quant(w, wspec) if wspec else w.clone(), requires_grad=False)
        self.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False) if lin.bias is not None else None
        self.calibrating = False
        self.token_keep: torch.Tensor | None = None
        self.register_buffer("a_lo", None)
        self.register_buffer("a_hi", None)
        self.a_scale: torch.Tensor | None = None
        self.a_zero: torch.Tensor | None = None
        self.fp_cols: torch.Tensor | None = None
        self.fp_threshold: float | None = None
        self.ospec: QuantSpec | None = None

    def _observe(self, x: torch.Tensor) -> None:
        xb = blocks(x.detach().float(), self.aspec.granularity, self.aspec.group_size)
        lo, hi = block_range(xb, self.aspec, dims=(0, 2))  # [1, G, 1]: over all tokens in each block
        self.a_lo = lo if self.a_lo is None else torch.minimum(self.a_lo, lo)
        self.a_hi = hi if self.a_hi is None else torch.maximum(self.a_hi, hi)

    def freeze(self) -> None:
        """Static activations: fix qparams from the observed range."""
        if self.aspec is not None and not self.aspec.dynamic:
            if self.a_lo is None:
                raise RuntimeError(f"{self.name}: static activation ranges were never calibrated")
            self.a_scale, self.a_zero = qparams_from_range(self.a_lo, self.a_hi, self.aspec)
        self.calibrating = False

    def _kept_cols(self, x: torch.Tensor) -> torch.Tensor | None:
        """bool [in]: input channels left in high precision for this call (or None)."""
        cols = self.fp_cols.to(x.device) if self.fp_cols is not None else None
        if self.fp_threshold is not None:
            dyn = x.detach().abs().reshape(-1, x.shape[-1]).amax(0) > self.fp_threshold  # [in]
            cols = dyn if cols is None else cols | dyn
        return cols

    def quant_input(self, x: torch.Tensor) -> torch.Tensor:
        a = self.aspec
        if a is None:
            return x
        cols = self._kept_cols(x)
        xin = x if cols is None else x.masked_fill(cols, 0.0)  # outlier channels out of the ranges
        if self.token_keep is not None:  # kept tokens out of the ranges too (static and dynamic)
            xin = xin.masked_fill(self.token_keep.to(x.device)[..., None], 0.0)
        if self.calibrating:
            if not a.dynamic:
                self._observe(xin if self.token_keep is None else xin[~self.token_keep.to(x.device)])
            return x
        # static scales are [1, G, 1] and broadcast over every row of the blocked input
        xq = fake_quant(xin, a) if a.dynamic else fake_quant(xin, a, self.a_scale, self.a_zero)
        if cols is not None:
            xq = torch.where(cols, x, xq)
        if self.token_keep is not None:
            keep = self.token_keep.reshape(*self.token_keep.shape, 1).to(x.device)
            xq = torch.where(keep, x, xq)
        return xq

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(self.quant_input(x), self.weight, self.bias)
        return y if self.ospec is None else fake_quant(y, self.ospec)

    def extra_repr(self) -> str:
        w = f"w{self.wspec.bits}/{self.wspec.granularity}" if self.wspec else "w-fp"
        a = f"a{self.aspec.bits}/{self.aspec.granularity}/{'dyn' if self.aspec.dynamic else 'static'}" if self.aspec else "a-fp"
        kv = f", out {self.ospec.bits}/{self.ospec.granularity}" if self.ospec else ""
        return f"{self.in_features}->{self.out_features}, {w}, {a}{kv}"
