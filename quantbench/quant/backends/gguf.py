"""gguf backend: llama.cpp weight types (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, MXFP4), simulated through the
`gguf` package's own quantize/dequantize (quantbench.quant.gguf_quant), so the simulated weights are
bit for bit what a GGUF file written by quantbench.export.gguf stores and llama.cpp reads.

A recipe names the type in its backend options; its `weights` spec is bookkeeping (bits and the
32-element block) checked against the type:

    {name: my-q4, backend: gguf, backend_options: {qtype: Q4_0},
     weights: {bits: 4, granularity: group, group_size: 32}, exclude: []}

What the backend quantizes is what llama.cpp's `llama-quantize` writes for a "mostly <qtype>" file
(quantbench.quant.gguf_model.llama_cpp_qtypes): every planned linear gets `qtype`; the output matrix
(lm_head, or the tied embedding that serves as it) gets Q8_0 (llama-quantize picks Q6_K, which the gguf
package cannot write) unless `output_qtype` says otherwise; an untied input embedding gets `qtype`.
Linears left out of the plan (exclude, or overrides with `weights: null`) are F16, as in the file.
Norms stay F32 (untouched).

Size: each quantized linear is a QuantLinear whose stored-weight record reports the type's real bytes
(the package's GGML_QUANT_SIZES); an untied, quantized embedding becomes a GgufEmbedding that holds its
GGUF bytes as a buffer, so quant/size.py counts exactly what the file stores for it.
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ...core.errors import QuantbenchError
from ...modeling.surgery import replace_module
from ..gguf_model import gguf_plan, llama_cpp_qtypes
from ..gguf_quant import gguf_dequantize, gguf_quantize, stored_nbytes
from ..plan import Plan
from ..plugin import Backend, BackendUnavailable, Options, QuantContext
from ..qlinear import QuantLinear
from ..spec import BACKENDS, QuantSpec

GGUF_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "MXFP4")
QType = Literal["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "MXFP4"]
# bits of the codes, symmetric (one scale per block) or not (scale + min): the bookkeeping spec
_SPEC = {"Q8_0": (8, True), "Q4_0": (4, True), "Q4_1": (4, False), "Q5_0": (5, True), "Q5_1": (5, False),
         "MXFP4": (4, True)}
BLOCK = 32  # every type above stores blocks of 32 consecutive input elements


def gguf_weight_spec(qtype: str) -> QuantSpec:
    """The QuantSpec a recipe of this type declares (bits, symmetric, group of 32)."""
    bits, sym = _SPEC[qtype]
    return QuantSpec(bits=bits, symmetric=sym, granularity="group", group_size=BLOCK)


@dataclass(frozen=True, eq=False)
class GgufWeight:
    """A weight as a GGUF file stores it: `values` are the dequantized weights (fp32, [out, in]),
    storage is the type's bytes. Duck-types primitives.QTensor for QuantLinear (dequantize, storage_bits)."""

    qtype: str
    values: torch.Tensor

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.values if dtype is None else self.values.to(dtype)

    def storage_bits(self) -> float:
        return 8.0 * stored_nbytes(tuple(self.values.shape), self.qtype)


class GgufEmbedding(nn.Module):
    """An input embedding stored as GGUF blocks: `gguf_data` (uint8, persistent: what size accounting
    counts) and the dequantized `weight` used by forward (a non-persistent buffer)."""

    def __init__(self, emb: nn.Embedding, qtype: str, data: np.ndarray, values: torch.Tensor):
        super().__init__()
        self.qtype, self.padding_idx = qtype, emb.padding_idx
        self.num_embeddings, self.embedding_dim = emb.num_embeddings, emb.embedding_dim
        self.register_buffer("gguf_data", torch.from_numpy(np.ascontiguousarray(data)).reshape(-1))
        self.register_buffer("weight", values.to(emb.weight.device, emb.weight.dtype), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight, self.padding_idx)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, gguf {self.qtype}"


def _gguf_name_reason(names: list[str]) -> str | None:
    """None when every linear has a GGUF (llama) tensor name, else why not."""
    import gguf

    idx = [int(m.group(1)) for n in names if (m := re.search(r"\.(\d+)\.", n))]
    table = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, max(idx, default=0) + 1)
    for n in names:
        if table.get_name(n) is None:
            return (f"{n}: GGUF (llama.cpp) types serve Llama-family models (llama, mistral, qwen2); this "
                    "layer has no GGUF tensor name")
    return None


def gguf_types(model: nn.Module, names: list[str], qtype: str, output_qtype: str | None = None) -> dict[str, str]:
    """param name -> GGUF type for every 2-D weight of the model (a tied lm_head under the embedding's
    name), as the file will store it; `names`: the planned linears (the others are F16)."""
    types = llama_cpp_qtypes(model, qtype)
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    head = model.get_output_embeddings()
    head_name = _module_name(model, head) if head is not None else None
    out_param = _param_name(model, head.weight) if head is not None else None
    for pname in types:
        mod = pname.removesuffix(".weight")
        if pname == out_param:  # the output matrix, or the tied embedding that serves as it
            if head_name not in names:
                types[pname] = "F16"
            elif output_qtype is not None:
                types[pname] = output_qtype
        elif mod in linears and mod not in names:
            types[pname] = "F16"
    return types


@BACKENDS.register("gguf")
class Gguf(Backend):
    name = "gguf"
    real = False  # simulated in float, bit-exact with the file (the file is written by `quantbench export`)

    class Options(Options):
        qtype: QType = "Q4_0"
        output_qtype: Literal["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "MXFP4", "F16"] | None = None

    def supports(self, plan: Plan, names: list[str]) -> str | None:
        qtype = self.Options.model_validate(plan.recipe.backend_options).qtype if plan.recipe.backend == "gguf" \
            else "Q4_0"
        want = gguf_weight_spec(qtype)
        for n in names:
            lp = plan.linears[n]
            if lp.activations is not None or lp.kv is not None:
                return (f"{n}: llama.cpp quantizes activations inside its kernels; the gguf backend simulates "
                        "weights only (activations: null, kv: null)")
            w = lp.weights
            if w is None or (w.bits, w.symmetric, w.granularity, w.group_size) != \
                    (want.bits, want.symmetric, want.granularity, want.group_size):
                return (f"{n}: GGUF {qtype} stores {want.bits}-bit {'symmetric' if want.symmetric else 'asymmetric'} "
                        f"blocks of {BLOCK}: weights must be {{bits: {want.bits}, symmetric: {str(want.symmetric).lower()}, "
                        f"granularity: group, group_size: {BLOCK}}}")
        return _gguf_name_reason(names)

    @torch.no_grad()
    def apply(self, model: nn.Module, plan: Plan, names: list[str], ctx: QuantContext, opts) -> nn.Module:
        try:
            types = gguf_types(model, names, opts.qtype, opts.output_qtype)
            gguf_plan(model, types)  # the file's checks (architecture, config, block sizes) before any work
        except QuantbenchError as e:
            raise BackendUnavailable(f"gguf: {e}") from None
        params = dict(model.named_parameters())

        def stored():  # one tensor at a time: quantized, dequantized, installed
            for pname, qtype in types.items():
                data = gguf_quantize(params[pname], qtype, pname)
                yield pname, qtype, data, torch.from_numpy(np.ascontiguousarray(gguf_dequantize(data, qtype)))
        return install_gguf_weights(model, plan, names, stored())


StoredTensor = tuple[str, str, np.ndarray, torch.Tensor]  # param name, GGUF type, the file's bytes, fp32 values


@torch.no_grad()
def install_gguf_weights(model: nn.Module, plan: Plan, names: list[str], stored: Iterable[StoredTensor]) -> nn.Module:
    """Put a GGUF file's weights into `model`, one tensor at a time (values in the parameter's layout).
    Planned linears become QuantLinears over GgufWeights, a quantized untied embedding a GgufEmbedding,
    other weights take the values in place; a tied output matrix stays one tensor with the embedding."""
    params = dict(model.named_parameters())
    emb = model.get_input_embeddings()
    tied = model.get_output_embeddings() is not None and model.get_output_embeddings().weight is emb.weight
    types = {}
    for pname, qtype, data, flat in stored:
        p, types[pname] = params[pname], qtype
        values = flat.reshape(p.shape)
        mod_name = pname.removesuffix(".weight")
        if mod_name in names:
            old = model.get_submodule(mod_name)
            replace_module(model, mod_name, QuantLinear(old, plan.linears[mod_name], GgufWeight(qtype, values)))
        elif p is emb.weight and not tied and qtype not in ("F16", "F32"):
            replace_module(model, _module_name(model, emb), GgufEmbedding(emb, qtype, data, values))
        else:
            p.copy_(values.to(p.dtype))  # F16 leftovers, and the tied embedding/output matrix
    head_name = _module_name(model, model.get_output_embeddings()) if tied else None
    if head_name in names:  # tied output: a QuantLinear sharing the (quantized) embedding tensor
        w = emb.weight
        q = QuantLinear(model.get_submodule(head_name), plan.linears[head_name],
                        GgufWeight(types[_param_name(model, w)], w.data.clone()))
        replace_module(model, head_name, q)
        q.weight = w  # keep the tie: one tensor, counted once by quant/size.py
    return model


def _module_name(model: nn.Module, mod: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is mod)


def _param_name(model: nn.Module, p: torch.Tensor) -> str:
    return next(n for n, q in model.named_parameters() if q is p)
