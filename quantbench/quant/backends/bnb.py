"""bitsandbytes backends: LLM.int8 (`bnb-int8`, Linear8bitLt) and 4-bit NF4/FP4 (`bnb-nf4`, `bnb-fp4`, Linear4bit).

What each honours (anything else in the plan is rejected before any work):
  bnb-int8: weights int8, symmetric, per channel (row absmax); activations none, or int8 per-token
            dynamic symmetric (what its CUDA int8 matmul does). Option threshold (default 0.0 =
            plain int8; > 0: LLM.int8 outlier decomposition on CUDA).
  bnb-nf4 / bnb-fp4: 4-bit weights in groups (the group size is bitsandbytes' blocksize: 64, 128,
            256, ...); the codebook is NF4/FP4 (not an integer grid); no activation quantization.
            Option compute_dtype (default: the model's dtype).
Measured on CPU with bitsandbytes 0.50.2: both run; Linear8bitLt's CPU path computes with the
dequantized int8 weights, so its output does not depend on `threshold` there (activations are
not quantized); on CUDA the threshold selects fp16 outlier columns as in the paper.
Models must run under torch.no_grad(), not inference_mode (bitsandbytes CPU layers fail there).
"""
from __future__ import annotations

import re
import traceback
from abc import abstractmethod
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
from pydantic import Field

from ...modeling.surgery import as_linear, replace_module
from ..plan import Plan
from ..plugin import Backend, BackendUnavailable, Options, QuantContext
from ..spec import BACKENDS
from ._common import reattach_online

BNB_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)

# What bitsandbytes (or torch's op dispatcher / CUDA init, called by it) says when this build or this machine
# cannot run a kernel. Anything else, e.g. "invalid blocksize 3" or an AttributeError in our own code, is a bug.
_UNAVAILABLE = re.compile(r"not implemented|no kernel|could not run|not available|not supported|"
                          r"not compiled with cuda|cuda is required|no cuda|no gpu|native code method|"
                          r"no compatible .*binary|failed to load backend", re.I)


def _bnb():
    try:
        import bitsandbytes as bnb
    except Exception as e:  # ImportError, or a broken native library
        raise BackendUnavailable(f"bitsandbytes cannot be imported: {e}") from None
    return bnb


def _within(filename: str, package) -> bool:
    return Path(filename).resolve().is_relative_to(Path(package.__file__).resolve().parent)


def _is_unavailability(e: BaseException, bnb) -> bool:
    """True when `e` is bitsandbytes saying it cannot run here: raised inside the bitsandbytes package
    (the innermost frame outside torch is a bitsandbytes file: torch frames are its dispatcher, `torch._check`,
    CUDA init) with a NotImplementedError or an unavailability message. Errors from our code, transformers,
    or a bitsandbytes argument check are not."""
    for frame in reversed(traceback.extract_tb(e.__traceback__)):
        if _within(frame.filename, bnb):
            return isinstance(e, NotImplementedError) or bool(_UNAVAILABLE.search(str(e)))
        if not _within(frame.filename, torch):
            return False
    return False


class _BnB(Backend):
    @abstractmethod
    def _layer(self, bnb, lin: nn.Linear, plan_entry, opts, device: torch.device) -> nn.Module:
        """The bitsandbytes module replacing `lin`."""

    @torch.no_grad()
    def apply(self, model: nn.Module, plan: Plan, names: list[str], ctx: QuantContext, opts) -> nn.Module:
        bnb = _bnb()
        if ctx.device.type not in ("cpu", "cuda"):
            raise BackendUnavailable(f"bitsandbytes does not run on device {ctx.device.type}")
        if ctx.device.type == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailable("bitsandbytes: CUDA requested but not available")
        try:
            for name in names:
                old = model.get_submodule(name)
                new = self._layer(bnb, as_linear(old), plan.linears[name], opts, ctx.device)
                replace_module(model, name, new)
                reattach_online(old, new)
            model(input_ids=ctx.calib.batches[:1, :8].to(ctx.device))  # smoke test: fail here, not mid-evaluation
        except Exception as e:
            if not _is_unavailability(e, bnb):
                raise  # a bug (ours or a bad argument), not a missing kernel: never a silent skip
            first = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
            raise BackendUnavailable(f"bitsandbytes {self.name} cannot run on {ctx.device.type}: "
                                     f"{first.strip()[:160]}") from None
        return model


@BACKENDS.register("bnb-int8")
class BnbInt8(_BnB):
    name = "bnb-int8"

    class Options(Options):
        threshold: float = Field(0.0, ge=0)

    def supports(self, plan: Plan, names: list[str]) -> str | None:
        for n in names:
            lp = plan.linears[n]
            w, a = lp.weights, lp.activations
            if w is None or w.format != "int" or w.bits != 8 or not w.symmetric or w.granularity != "channel":
                return f"{n}: bitsandbytes int8 stores weights as int8, symmetric, per channel"
            if a is not None and (a.bits != 8 or a.format != "int" or not a.symmetric or a.granularity != "token"
                                  or not a.dynamic):
                return f"{n}: bitsandbytes int8 quantizes activations only as int8 per-token dynamic symmetric"
            if lp.kv is not None:
                return "kv quantization is simulated only"
        return None

    def _layer(self, bnb, lin: nn.Linear, lp, opts, device: torch.device) -> nn.Module:
        new = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                  has_fp16_weights=False, threshold=opts.threshold)
        new.weight = bnb.nn.Int8Params(lin.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
        if lin.bias is not None:
            new.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
        return new.to(device)  # quantizes the weights


class _Bnb4(_BnB):
    qtype = ""

    class Options(Options):
        compute_dtype: Literal["float32", "bfloat16", "float16"] | None = None

    def supports(self, plan: Plan, names: list[str]) -> str | None:
        for n in names:
            lp = plan.linears[n]
            w = lp.weights
            if w is None or w.bits != 4 or w.granularity != "group" or w.group_size not in BNB_BLOCKSIZES:
                return (f"{n}: bitsandbytes {self.qtype} stores 4-bit weights in blocks: weights need bits 4, "
                        f"granularity group, group_size in {BNB_BLOCKSIZES}")
            if lp.activations is not None or lp.kv is not None:
                return f"{n}: bitsandbytes {self.qtype} does not quantize activations or the KV cache"
        return None

    def _layer(self, bnb, lin: nn.Linear, lp, opts, device: torch.device) -> nn.Module:
        cdt = getattr(torch, opts.compute_dtype) if opts.compute_dtype else lin.weight.dtype
        new = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None, quant_type=self.qtype,
                                compute_dtype=cdt)
        new.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type=self.qtype,
                                       blocksize=lp.weights.group_size)
        if lin.bias is not None:
            new.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
        return new.to(device)


@BACKENDS.register("bnb-nf4")
class BnbNF4(_Bnb4):
    name, qtype = "bnb-nf4", "nf4"


@BACKENDS.register("bnb-fp4")
class BnbFP4(_Bnb4):
    name, qtype = "bnb-fp4", "fp4"
