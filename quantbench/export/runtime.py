"""Real speed and memory of an exported model, through the runtimes present, or an honest
"not measured: <reason>".

- transformers: the verified reload itself (load seconds, tensor memory once loaded, tokens/s over the
  run's evaluation windows). On CPU, compressed-tensors decompresses the weights to the model dtype and
  fake-quantizes activations: it proves the numbers, it is not a fast int8 runtime.
- torchao int8 (CPU or CUDA): for plans whose quantized linears are int8 symmetric per-channel weights
  with no, dynamic per-token, or static per-tensor symmetric int8 activations, our codes and scales go
  into torchao Int8Tensors (no re-quantization of the weights; torchao quantizes activations with its
  own per-token formula) and run through its int8 matmul; perplexity and tokens/s are recorded,
  unverified (activation rounding may differ from compressed-tensors').
- llama.cpp (GGUF files): through quantbench/export/llama_cpp_probe.py in the Python named by
  $QUANTBENCH_LLAMA_CPP_PYTHON (one with the `cyllama` wheel), else this one when it has the wheel; prefill tokens/s and perplexity,
  unverified (llama.cpp's own kernels and activation rounding).
- vLLM (compressed-tensors folders), where vllm is installed and a CUDA GPU is visible: through
  quantbench/export/vllm_probe.py in a child process, vLLM's own loader and kernels score the windows;
  perplexity and prefill tokens/s, unverified (its kernels, its dtype: fp16 for an fp32 checkpoint).
  Otherwise `export_vllm` says exactly why not ("not measured: vllm not installed", "... no CUDA GPU").
"""
from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
import tempfile
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..data.corpus import Windows
from ..eval.lm import evaluate_lm
from ..modeling.surgery import replace_module
from ..quant.backends._common import tensor_bytes
from ..quant.backends.llamacpp import LLAMA_CPP_ENV, child_python
from ..quant.qlinear import QuantLinear

VLLM_TIMEOUT_S = 3600


def model_mb(model: nn.Module) -> float:
    """Bytes of every parameter and buffer as held in memory (shared storage once), in MiB."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        key = (t.data_ptr(), t.numel()) if type(t) in (torch.Tensor, nn.Parameter) else id(t)
        if key not in seen:
            seen.add(key)
            total += tensor_bytes(t)
    return total / 2**20


def vllm_eval(path: Path, windows: Windows) -> dict:
    """vLLM's perplexity and prefill tokens/s on the windows (vllm_probe.py in a child process), or
    'not measured: <exact reason>'."""
    if find_spec("vllm") is None:
        return {"export_vllm": "not measured: vllm not installed"}
    if not torch.cuda.is_available():
        return {"export_vllm": "not measured: no CUDA GPU visible (vLLM runs on CUDA)"}
    free, total = torch.cuda.mem_get_info()
    util = round(0.9 * free / total, 3)  # vLLM's budget: what this process leaves free
    with tempfile.TemporaryDirectory() as tmp:
        npz, out = Path(tmp) / "windows.npz", Path(tmp) / "vllm.json"
        np.savez(npz, ids=windows.input_ids.numpy(), score_from=windows.score_from.numpy())
        try:
            proc = subprocess.run([sys.executable, "-m", "quantbench.export.vllm_probe", str(path), str(npz),
                                   str(util), str(out)], capture_output=True, text=True, timeout=VLLM_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return {"export_vllm": f"not measured: vLLM did not finish within {VLLM_TIMEOUT_S} s"}
        if proc.returncode != 0 or not out.exists():
            last = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1][:160]
            return {"export_vllm": f"not measured: vLLM failed here ({last})"}
        r = json.loads(out.read_text())
    return {"export_vllm": f"vLLM {r['version']} (its loader and kernels, {r['dtype']})",
            "export_vllm_ppl": math.exp(r["nll_sum"] / max(r["n_tokens"], 1)),
            "export_vllm_tok_s": round(r["tokens"] / max(r["seconds"], 1e-9), 1)}


def _torchao_reason(sim: nn.Module) -> str | None:
    qls = [m for m in sim.modules() if isinstance(m, QuantLinear)]
    if not qls:
        return "no quantized linears"
    for q in qls:
        w, a = q.plan.weights, q.aspec
        if w is None or (w.format, w.bits, w.symmetric, w.granularity) != ("int", 8, True, "channel") or q.keep:
            return "torchao int8 runs int8 symmetric per-channel weights only"
        if a is not None and ((a.format, a.bits, a.symmetric) != ("int", 8, True) or
                              (a.granularity, a.dynamic) not in (("token", True), ("tensor", False))):
            return "torchao int8 runs no, dynamic per-token or static per-tensor symmetric int8 activations only"
        if q.ospec is not None:
            return "kv quantization is simulated only"
    return None


def torchao_int8(sim: nn.Module) -> tuple[nn.Module | None, str]:
    """A copy of the simulated model whose quantized linears run torchao int8 kernels on our codes and
    scales, or (None, 'not measured: reason')."""
    reason = _torchao_reason(sim)
    if reason:
        return None, f"not measured: {reason}"
    try:
        from torchao.quantization import PerRow, PerTensor
        from torchao.quantization.quantize_.workflows.int8.int8_tensor import Int8Tensor, QuantizeTensorToInt8Kwargs
    except Exception as e:  # noqa: BLE001
        return None, f"not measured: torchao int8 is not importable ({str(e).splitlines()[0][:80]})"
    model = copy.deepcopy(sim)
    for name, q in [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]:
        qt, a = q.qweight, q.aspec
        act, act_scale = None, None
        if a is not None:
            act = QuantizeTensorToInt8Kwargs(granularity=PerRow() if a.dynamic else PerTensor())
            act_scale = None if a.dynamic else q.a_scale.reshape(1, 1, 1).to(qt.scale.dtype)  # [B, T, D] inputs
        w = Int8Tensor(qt.codes, qt.scale.reshape(-1, 1), [1, qt.codes.shape[1]], q.weight.dtype,
                       act_quant_kwargs=act, act_quant_scale=act_scale)
        lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, device="meta")
        lin.weight = nn.Parameter(w, requires_grad=False)
        if q.bias is not None:
            lin.bias = nn.Parameter(q.bias.data.clone(), requires_grad=False)
        replace_module(model, name, lin)
    return model, "torchao Int8Tensor (our int8 codes and scales; torchao's activation quantization)"


def torchao_eval(sim: nn.Module, windows: Windows, batch_size: int, device: torch.device) -> dict:
    model, note = torchao_int8(sim)
    if model is None:
        return {"export_torchao": note}
    try:
        with torch.no_grad():
            res, _ = evaluate_lm(model, windows, batch_size, device)
    except Exception as e:  # noqa: BLE001 - a kernel missing on this machine is a measurement, not a crash
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        return {"export_torchao": f"not measured: torchao int8 failed here ({why})"}
    return {"export_torchao": note, "export_torchao_ppl": res.ppl, "export_torchao_tok_s": round(res.tok_per_s, 1)}


def llama_cpp_probe(path: Path, windows: Windows, logits_out: Path | None = None) -> dict | str:
    """llama_cpp_probe.py on the GGUF file over the windows, in the Python that has the cyllama wheel: its
    JSON result (with `logits_out`, the first window's logits saved there), or why it could not run (one line).
    The export's columns and the llamacpp rows' check (llama_cpp_check.py) both run llama.cpp through here."""
    py = child_python()  # $QUANTBENCH_LLAMA_CPP_PYTHON, else this Python when it has the wheel
    if py is None:
        return (f"set {LLAMA_CPP_ENV} to a Python with the cyllama wheel (pip install cyllama==0.2.18) "
                "to run llama.cpp on the file")
    with tempfile.TemporaryDirectory() as tmp:
        npz = Path(tmp) / "windows.npz"
        np.savez(npz, ids=windows.input_ids.numpy(), score_from=windows.score_from.numpy())
        probe = Path(__file__).with_name("llama_cpp_probe.py")
        extra = [str(logits_out)] if logits_out is not None else []
        proc = subprocess.run([py, str(probe), str(path), str(npz), str(torch.get_num_threads()), *extra],
                              capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1][:160]
        return f"llama.cpp probe failed ({last})"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def llama_cpp_eval(path: Path, windows: Windows) -> dict:
    """llama.cpp's perplexity and prefill tokens/s on the windows, or 'not measured: reason'."""
    r = llama_cpp_probe(path, windows)
    if isinstance(r, str):
        return {"export_llama_cpp": f"not measured: {r}"}
    return {"export_llama_cpp": f"llama.cpp via cyllama ({r.get('desc', '')})",
            "export_llama_cpp_ppl": math.exp(r["nll_sum"] / max(r["n_tokens"], 1)),
            "export_llama_cpp_tok_s": round(r["tokens"] / max(r["seconds"], 1e-9), 1)}
