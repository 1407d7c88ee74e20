"""llamacpp backend: every llama.cpp file type (Q4_K_M, Q5_K_M, Q6_K, IQ4_XS, Q8_0, ...) quantized by
llama.cpp itself, and the file's own weights evaluated.

    {name: my-q4km, backend: llamacpp, backend_options: {ftype: Q4_K_M},
     weights: {bits: 4, symmetric: false, granularity: group, group_size: 32}, exclude: []}

Steps: the model's weights as an F32 (or F16: `source`) GGUF (quantbench.quant.gguf_file, no tokenizer)
-> `llama_model_quantize` to `ftype` (the `cyllama` wheel, in a child process: quant/llama_cpp_quantize.py)
-> every tensor of the quantized file read back with the `gguf` package's dequantizers into the model
(QuantLinear over GgufWeight, as the gguf backend), so the row scores the file's model bit for bit.
The quantized file stays (Effects.gguf_file) until the row is done: llama.cpp itself scores it on the
row's windows beside ours (quantbench.export.llama_cpp_check: llama_cpp_ppl, llama_cpp_agrees).
llama.cpp picks each tensor's type (its mixtures raise attn_v/ffn_down, and fall back from k-quants
when a row is not a multiple of 256); the row records the types it really gave (`gguf_tensor_types`,
and per tensor in rows.jsonl) and the file's true bits per weight (`gguf_file_bpw`).

`weights` is bookkeeping (bits of the type's codes, the 32-element sub-block); llama.cpp decides every
tensor, so the plan must cover every linear (exclude: [], no overrides): cyllama 0.2.18 leaves
per-tensor type overrides and the importance matrix read-only (`imatrix: true` rows are skipped with
that reason; quant/imatrix.py writes the importance matrix for llama-quantize itself).
Without the wheel (or $QUANTBENCH_LLAMA_CPP_PYTHON naming a Python that has it) the row is skipped in one line.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from importlib.util import find_spec
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn as nn

from ...core.errors import QuantbenchError
from ..gguf_file import write_weights_gguf
from ..gguf_model import GgufTensor, from_llama_cpp_layout
from ..plan import Plan
from ..plugin import Backend, BackendUnavailable, Options, QuantContext
from ..spec import BACKENDS
from .gguf import StoredTensor, _gguf_name_reason, install_gguf_weights

LLAMA_CPP_ENV = "QUANTBENCH_LLAMA_CPP_PYTHON"  # a Python with the cyllama wheel (the export probe's too)
# llama.h `llama_ftype` names that llama_model_quantize writes (gguf.LlamaFileType holds their numbers)
FType = Literal["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q2_K_S", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S",
                "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS",
                "IQ3_S", "IQ3_M", "IQ1_S", "IQ1_M", "IQ4_NL", "IQ4_XS", "TQ1_0", "TQ2_0"]
IMATRIX_REASON = ("llamacpp: cyllama 0.2.18 leaves llama_model_quantize's `imatrix` parameter read-only (NULL), so "
                  "no importance matrix reaches the quantizer; write one with quantbench.quant.imatrix for llama-quantize")


def child_python() -> str | None:
    """The Python that runs llama.cpp: $QUANTBENCH_LLAMA_CPP_PYTHON, else this one when it has cyllama."""
    py = os.environ.get(LLAMA_CPP_ENV)
    if py:
        return py if Path(py).exists() else None
    return sys.executable if find_spec("cyllama") is not None else None


def ftype_number(ftype: str) -> int:
    from gguf import LlamaFileType

    return int(LlamaFileType[f"MOSTLY_{ftype}"])


def llama_quantize(src: Path, dst: Path, ftype: str, threads: int) -> float:
    """Run llama_model_quantize(src -> dst, ftype) in the child Python; seconds, or BackendUnavailable."""
    py = child_python()
    if py is None:
        raise BackendUnavailable(f"llamacpp: the cyllama wheel is not installed (pip install cyllama==0.2.18), "
                                 f"and {LLAMA_CPP_ENV} names no Python that has it")
    script = Path(__file__).parents[1] / "llama_cpp_quantize.py"
    proc = subprocess.run([py, str(script), str(src), str(dst), str(ftype_number(ftype)), str(threads)],
                          capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0 or not dst.exists():
        last = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1][:160]
        raise BackendUnavailable(f"llamacpp: llama_model_quantize to {ftype} failed ({last})")
    return float(json.loads(proc.stdout.strip().splitlines()[-1])["seconds"])


def read_gguf_weights(reader, src: list[GgufTensor]) -> Iterator[StoredTensor]:
    """Every tensor of the quantized file, one at a time: (HF param name, its GGUF type, its bytes, fp32
    values in the HF layout), dequantized by the `gguf` package (q/k rows back from llama.cpp's rope order)."""
    import gguf

    by_name = {e.gguf_name: e for e in src}
    for t in reader.tensors:
        entry = by_name[t.name]
        data = np.array(t.data)  # a copy: the reader's arrays are views of a memory map
        values = torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(data, t.tensor_type)))
        yield entry.hf_name, t.tensor_type.name, data, from_llama_cpp_layout(values.reshape(entry.shape), entry)


def file_notes(reader, n_params: int, ftype: str, seconds: float) -> dict:
    """Row columns: the ftype asked for, the types llama.cpp gave (counts, and per tensor), true bits/weight."""
    nbytes = sum(int(t.n_bytes) for t in reader.tensors)
    mats = [t for t in reader.tensors if len(t.shape) >= 2]
    counts = Counter(t.tensor_type.name for t in mats)
    return {"llamacpp_ftype": ftype, "llamacpp_quantize_s": round(seconds, 2),
            "gguf_tensor_types": " ".join(f"{q}:{n}" for q, n in sorted(counts.items())),
            "gguf_types": [f"{t.name}={t.tensor_type.name}" for t in mats],
            "gguf_file_bpw": round(8.0 * nbytes / n_params, 4)}


@BACKENDS.register("llamacpp")
class LlamaCpp(Backend):
    name = "llamacpp"
    real = False  # the file's weights, evaluated in float by our forward pass

    class Options(Options):
        ftype: FType = "Q4_K_M"
        source: Literal["F32", "F16"] = "F32"  # the GGUF llama.cpp quantizes from (convert_hf_to_gguf's outtype)
        imatrix: bool = False  # an importance matrix from the calibration set (not reachable through cyllama 0.2.18)

    def supports(self, plan: Plan, names: list[str]) -> str | None:
        missing = sorted(set(plan.linears) - set(names))
        if missing:
            return (f"{missing[0]}: llama.cpp picks every tensor's type and cyllama 0.2.18 cannot pass per-tensor "
                    "overrides: plan every linear (exclude: [], no overrides)")
        for n in names:
            lp = plan.linears[n]
            if lp.activations is not None or lp.kv is not None:
                return (f"{n}: llama.cpp quantizes activations inside its kernels; the llamacpp backend takes "
                        "weights only (activations: null, kv: null)")
        return _gguf_name_reason(names)

    @torch.no_grad()
    def apply(self, model: nn.Module, plan: Plan, names: list[str], ctx: QuantContext, opts) -> nn.Module:
        from gguf import GGUFReader

        if opts.imatrix:
            raise BackendUnavailable(IMATRIX_REASON)
        tmp = tempfile.TemporaryDirectory(prefix="quantbench-llamacpp-")  # kept: llama.cpp re-scores the file
        ctx.effects.scratch.append(tmp)
        src, dst = Path(tmp.name) / f"model-{opts.source}.gguf", Path(tmp.name) / f"model-{opts.ftype}.gguf"
        try:
            entries = write_weights_gguf(model, src, opts.source)
        except QuantbenchError as e:
            raise BackendUnavailable(f"llamacpp: {e}") from None
        secs = llama_quantize(src, dst, opts.ftype, torch.get_num_threads())
        src.unlink()
        reader = GGUFReader(dst)
        n_params = sum(p.numel() for p in model.parameters())
        ctx.effects.notes.update(file_notes(reader, n_params, opts.ftype, secs))
        model = install_gguf_weights(model, plan, names, read_gguf_weights(reader, entries))
        del reader  # the memory map closes
        ctx.effects.gguf_file = dst
        return model
