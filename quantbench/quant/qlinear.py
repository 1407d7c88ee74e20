"""The simulated quantized linear: weights on the plan's grid, fake-quantized input activations,
and (for k/v projections) a fake-quantized output = the KV cache content.

Everything it knows comes from its LinearPlan entry and the recipe's Effects: a QTensor handed
over by a mitigation (else round-to-nearest on the plan's weight spec) and keep policies (parts
of the input left in high precision and out of the activation ranges).

The stored form (`qweight`: codes, scales, zero points) is what export writes; forward uses only the
dequantized `weight`. A sweep drops the stored form as each linear is built (`release_stored`, keeping
its size in bits): the codes are int8 beside an fp32 weight (0.25x its bytes; 0.5x in bf16, 1x for fp4
codes held as floats), held for every quantized linear until the recipe is restored (docs/scale.md).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..modeling.surgery import as_linear
from .effects import KeepPolicy
from .plan import LinearPlan
from .microscaling import global_scale
from .primitives import QTensor, block_range, blocks, compute_dtype, fake_quant, qparams_from_range, quantize_weight


class QuantLinear(nn.Module):
    """y = fq_a(x) @ W_q^T + b (simulated in the input dtype); static activation ranges are
    observed while `calibrating` and fixed by `freeze()`; so is NVFP4's activation global scale
    (from the min and max over all calibration tokens, llm-compressor's static_minmax observer)."""

    def __init__(self, linear: nn.Module, plan: LinearPlan, qweight: QTensor | None = None,
                 keep: list[KeepPolicy] | None = None):
        super().__init__()
        lin = as_linear(linear)
        self.name, self.plan = plan.name, plan
        self.in_features, self.out_features = lin.in_features, lin.out_features
        self.aspec, self.ospec = plan.activations, plan.kv
        w = lin.weight.data
        if qweight is None and plan.weights is not None:
            qweight = quantize_weight(w, plan.weights)
        self.qweight = qweight  # the stored form (None: weights stay in full precision, or released)
        self.released_bits: float | None = None  # the stored form's bits once release_stored() dropped it
        wq = qweight.dequantize(w.dtype) if qweight is not None else w.clone()
        self.weight = nn.Parameter(wq, requires_grad=False)
        self.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False) if lin.bias is not None else None
        self.keep: list[KeepPolicy] = list(keep or [])
        self.calibrating = False
        self.register_buffer("a_lo", None)
        self.register_buffer("a_hi", None)
        self.a_scale: torch.Tensor | None = None
        self.a_zero: torch.Tensor | None = None
        self.a_global: torch.Tensor | None = None  # nvfp4 activations: the calibrated fp32 global scale [1]

    def release_stored(self) -> None:
        """Drop the stored form (codes, scales, zero points), keeping its size for storage_bits(): what a
        sweep's row needs once the weight is dequantized. Export needs the stored form and keeps it."""
        if self.qweight is not None:
            self.released_bits = self.qweight.storage_bits()
            self.qweight = None

    def _observe(self, x: torch.Tensor) -> None:
        if self.aspec.format == "nvfp4":  # one range per tensor, kept in x's dtype (generate_gparam computes in it)
            xb = blocks(x.detach().to(compute_dtype(x.dtype)), "tensor")
        else:
            xb = blocks(x.detach().float(), self.aspec.granularity, self.aspec.group_size)
        lo, hi = block_range(xb, self.aspec, dims=(0, 2))  # [1, G, 1]: over all tokens in each block
        self.a_lo = lo if self.a_lo is None else torch.minimum(self.a_lo, lo)
        self.a_hi = hi if self.a_hi is None else torch.maximum(self.a_hi, hi)

    def freeze(self) -> None:
        """Static activations: fix qparams from the observed range."""
        if self.aspec is not None and self.aspec.calibrated:
            if self.a_lo is None:
                raise RuntimeError(f"{self.name}: static activation ranges were never calibrated")
            if self.aspec.format == "nvfp4":
                self.a_global = global_scale(self.a_lo.reshape(()), self.a_hi.reshape(()))
            else:
                self.a_scale, self.a_zero = qparams_from_range(self.a_lo, self.a_hi, self.aspec)
        self.calibrating = False

    def _kept(self, x: torch.Tensor) -> torch.Tensor | None:
        """One bool mask broadcastable to x: the union of every keep policy's mask."""
        mask = None
        for p in self.keep:
            m = p.mask(x)
            if m is not None:
                m = m.to(x.device)
                mask = m if mask is None else mask | m
        return mask

    def quant_input(self, x: torch.Tensor) -> torch.Tensor:
        a = self.aspec
        if a is None:
            return x
        kept = self._kept(x)
        xin = x if kept is None else x.masked_fill(kept, 0.0)  # kept parts out of the ranges (0 is in every range)
        if self.calibrating:
            if a.calibrated:
                self._observe(xin)
            return x
        # static scales are [1, G, 1] and broadcast over every row of the blocked input
        if a.dynamic:
            xq = fake_quant(xin, a, global_scale=self.a_global)
        else:
            xq = fake_quant(xin, a, self.a_scale, self.a_zero)
        return xq if kept is None else torch.where(kept, x, xq)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(self.quant_input(x), self.weight, self.bias)
        return y if self.ospec is None else fake_quant(y, self.ospec)

    def storage_bits(self) -> float:
        """Deployed size: the stored weight (codes + scales + zeros, or 16-bit when not quantized),
        16-bit bias, static activation scales (and zero points) or nvfp4's 32-bit activation global scale,
        and the side tables of keep policies."""
        if self.qweight is not None:
            w = self.qweight.storage_bits()
        else:
            w = self.released_bits if self.released_bits is not None else 16.0 * self.weight.numel()
        b = 16.0 * self.bias.numel() if self.bias is not None else 0.0
        a = 0.0
        if self.a_scale is not None:
            a = 16.0 * self.a_scale.numel() + (0.0 if self.aspec.symmetric else self.aspec.bits * self.a_zero.numel())
        if self.a_global is not None:
            a += 32.0 * self.a_global.numel()
        return w + b + a + sum(p.side_bits() for p in self.keep)

    def extra_repr(self) -> str:
        w = self.plan.weights.short() if self.plan.weights else "w-fp"
        a = self.aspec.short() if self.aspec else "a-fp"
        kv = f", out {self.ospec.short()}" if self.ospec else ""
        keep = f", keep {'+'.join(p.kind for p in self.keep)}" if self.keep else ""
        return f"{self.in_features}->{self.out_features}, {w}, {a}{kv}{keep}"
