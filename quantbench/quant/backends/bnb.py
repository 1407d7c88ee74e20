"""bitsandbytes backends: LLM.int8 (`bnb-int8`, Linear8bitLt) and 4-bit NF4/FP4 (`bnb-nf4`, `bnb-fp4`, Linear4bit).

backend_options: threshold (bnb-int8, default 0.0 = plain int8 without outlier decomposition),
blocksize (4-bit, default 64), compute_dtype (4-bit, default: the model's dtype).
Measured on CPU with bitsandbytes 0.50.2: both run; Linear8bitLt's CPU path computes with the
dequantized int8 weights, so its output does not depend on `threshold` there (activations are
not quantized); on CUDA the threshold selects fp16 outlier columns as in the paper.
Models must run under torch.no_grad(), not inference_mode (bitsandbytes CPU layers fail there).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ...errors import QuantbenchError
from ..apply import target_linears
from ..qlinear import as_linear
from . import BackendUnavailable, register
from ._common import replace_module, weight_bytes


def _bnb():
    try:
        import bitsandbytes as bnb
    except Exception as e:  # ImportError, or a broken native library
        raise BackendUnavailable(f"bitsandbytes cannot be imported: {e}") from None
    return bnb


def _int8_layer(bnb, lin: nn.Linear, thr: float, device: torch.device) -> nn.Module:
    new = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None,
                              has_fp16_weights=False, threshold=thr)
    new.weight = bnb.nn.Int8Params(lin.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    if lin.bias is not None:
        new.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
    return new.to(device)  # quantizes the weights


def _4bit_layer(bnb, lin: nn.Linear, qtype: str, opts: dict, device: torch.device) -> nn.Module:
    cdt = getattr(torch, opts.get("compute_dtype", str(lin.weight.dtype).removeprefix("torch.")))
    new = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None, quant_type=qtype,
                            compute_dtype=cdt)
    new.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type=qtype,
                                   blocksize=int(opts.get("blocksize", 64)))
    if lin.bias is not None:
        new.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
    return new.to(device)


@torch.no_grad()
def _convert(model: nn.Module, recipe, ctx, make) -> nn.Module:
    if ctx.device.type not in ("cpu", "cuda"):
        raise BackendUnavailable(f"bitsandbytes does not run on device {ctx.device.type}")
    before = weight_bytes(model)
    try:
        for name, mod in target_linears(model, recipe):
            replace_module(model, name, make(as_linear(mod)))
        model(input_ids=ctx.calib[:1, :8].to(ctx.device))  # smoke test: fail here, not mid-evaluation
    except (RuntimeError, AttributeError, ValueError) as e:  # RuntimeError includes "not implemented" errors
        raise BackendUnavailable(f"bitsandbytes {recipe.backend} cannot run on {ctx.device.type}: "
                                 f"{str(e).splitlines()[0][:160]}") from None
    ctx.notes.update(measured_weight_bytes_fp=before, measured_weight_bytes=weight_bytes(model))
    if ctx.prequantized:
        ctx.notes["backend_note"] = "weights pre-quantized by a mitigation were re-quantized by the backend"
    return model


def _check_bits(recipe, bits: int) -> None:
    if recipe.weights is not None and recipe.weights.bits != bits:
        raise QuantbenchError(f"recipe '{recipe.name}': backend {recipe.backend} stores {bits}-bit weights "
                              f"but weights.bits is {recipe.weights.bits}")


def int8(model: nn.Module, recipe, ctx) -> nn.Module:
    bnb, thr = _bnb(), float(recipe.backend_options.get("threshold", 0.0))
    _check_bits(recipe, 8)
    model = _convert(model, recipe, ctx, lambda lin: _int8_layer(bnb, lin, thr, ctx.device))
    ctx.notes["bnb_threshold"] = thr
    return model


def _four_bit(qtype: str):
    def backend(model: nn.Module, recipe, ctx) -> nn.Module:
        bnb = _bnb()
        _check_bits(recipe, 4)
        return _convert(model, recipe, ctx, lambda lin: _4bit_layer(bnb, lin, qtype, recipe.backend_options, ctx.device))
    return backend


register("bnb-int8", int8)
register("bnb-nf4", _four_bit("nf4"))
register("bnb-fp4", _four_bit("fp4"))
