"""Checkpoints that are already quantized: detected at load and said so in one line.

Sources: a `quantization_config` in config.json (GPTQ, AWQ, bitsandbytes, compressed-tensors, fp8,
...), a .gguf file (its tensor types), or quantized modules found on the loaded model (bitsandbytes
Linear4bit / Linear8bitLt). Two cases:
- dequantized at load (GGUF; compressed-tensors, loaded with run_compressed=False; fp8 on CPU):
  the weights are plain float tensors sitting on the checkpoint's grid. quantbench runs as usual and
  says that a second grid is stacked on the first (the census's grid detector shows it too).
- kept quantized (bitsandbytes modules; GPTQ/AWQ kernels): the run evaluates the model as loaded
  (recipe `as-loaded`) and refuses any recipe that would quantize it again, with the reason.
A checkpoint whose quantization this environment cannot load (e.g. GPTQ without gptqmodel) is
refused at load in one line naming the method and the missing package.
"""
from __future__ import annotations

import importlib.util
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ..core.errors import QuantbenchError

KEPT = {"gptq", "awq", "bitsandbytes", "hqq", "torchao", "quanto", "eetq", "aqlm", "exl2", "higgs", "vptq"}
NEEDS = {"gptq": ("gptqmodel", "optimum"), "awq": ("gptqmodel",), "hqq": ("hqq",), "aqlm": ("aqlm",),
         "eetq": ("eetq",), "vptq": ("vptq",)}
_ATTR = "_quantbench_prequant"


@dataclass(frozen=True)
class PreQuant:
    method: str  # gptq | awq | bitsandbytes | compressed-tensors | fp8 | gguf | ...
    detail: str  # e.g. "4-bit, group 128" or "Q4_1 x 210 tensors"
    source: str  # "config.json quantization_config", "GGUF file", "quantized modules"
    kept: bool  # weights stay in quantized modules (re-quantizing them is refused)

    def line(self) -> str:
        what = f"{self.method} ({self.detail})" if self.detail else self.method
        if self.kept:
            return (f"already quantized: {what}, from the {self.source}; it is evaluated as loaded (recipe "
                    "'as-loaded') and recipes that would quantize it again are refused")
        return (f"already quantized: {what}, from the {self.source}, dequantized to float at load; quantizing it "
                "again stacks a second grid on the first (weight-only results at matching group sizes look better)")

    def as_dict(self) -> dict:
        return asdict(self) | {"line": self.line()}


def _detail(qc: dict) -> str:
    method = str(qc.get("quant_method", "")).lower()
    if method == "bitsandbytes":
        return "4-bit " + str(qc.get("bnb_4bit_quant_type", "fp4")) if qc.get("load_in_4bit") else "8-bit (LLM.int8)"
    if method == "compressed-tensors":
        groups = qc.get("config_groups") or {}
        w = next((g.get("weights") for g in groups.values() if isinstance(g, dict) and g.get("weights")), None) or {}
        parts = [f"{w['num_bits']}-bit" if "num_bits" in w else "", w.get("strategy", ""),
                 f"group {w['group_size']}" if w.get("group_size") else "", qc.get("format", "")]
        return ", ".join(p for p in parts if p)
    parts = [f"{qc['bits']}-bit" if "bits" in qc else "", f"group {qc['group_size']}" if qc.get("group_size") else ""]
    return ", ".join(p for p in parts if p)


def from_config(qc) -> PreQuant | None:
    """A config's quantization_config (dict or transformers object) -> PreQuant."""
    if qc is None:
        return None
    if not isinstance(qc, dict):
        qc = qc.to_dict() if hasattr(qc, "to_dict") else dict(vars(qc))
    method = str(qc.get("quant_method", "unknown")).lower().replace("_", "-")
    method = "compressed-tensors" if method in ("compressed-tensors", "sparseml") else method
    kept = method in KEPT or (method == "compressed-tensors" and qc.get("run_compressed") is True)
    return PreQuant(method, _detail(qc), "config.json quantization_config", kept)


def from_gguf(path: str | Path) -> PreQuant | None:
    """The tensor types of a .gguf file (read with the gguf package), e.g. 'Q4_1 x 210, Q6_K x 1'."""
    from gguf import GGUFReader

    counts: dict[str, int] = {}
    for t in GGUFReader(str(path)).tensors:
        name = t.tensor_type.name
        if name not in ("F32", "F16", "BF16", "F64"):
            counts[name] = counts.get(name, 0) + 1
    if not counts:
        return None
    detail = ", ".join(f"{k} x {v} tensors" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
    return PreQuant("gguf", detail, "GGUF file", kept=False)


def quantized_modules(model: nn.Module) -> dict[str, str]:
    """Modules holding quantized weights, by kind: {'bnb-4bit': ..., 'bnb-8bit': ...} -> a module name."""
    found: dict[str, str] = {}
    for name, mod in model.named_modules():
        cls = type(mod).__name__
        if cls == "Linear4bit":
            found.setdefault("bnb-4bit", name)
        elif cls == "Linear8bitLt":
            found.setdefault("bnb-8bit", name)
        elif cls in ("QuantLinear", "WQLinear_GEMM", "WQLinear_GEMV", "CompressedLinear") and \
                not hasattr(mod, "plan"):  # quantbench's own simulated QuantLinear carries a plan
            found.setdefault(cls, name)
    return found


@torch.no_grad()
def dequantized_weight(mod: nn.Module) -> torch.Tensor | None:
    """The float [out, in] weight of a bitsandbytes module (None for anything else)."""
    cls = type(mod).__name__
    if cls == "Linear4bit":
        import bitsandbytes.functional as bf

        return bf.dequantize_4bit(mod.weight.data, mod.weight.quant_state).float()
    if cls == "Linear8bitLt":
        w, scb = mod.weight, getattr(mod.weight, "SCB", None)
        scb = scb if scb is not None else getattr(getattr(mod, "state", None), "SCB", None)
        if scb is not None and w.dtype == torch.int8:
            return w.data.float() * scb.float()[:, None] / 127.0
    return None


def read_config(src: str) -> dict | None:
    p = Path(src) / "config.json"
    return json.loads(p.read_text()) if p.is_file() else None


def before_load(spec: str, src: str, gguf_path: str | Path | None = None) -> tuple[PreQuant | None, dict]:
    """Before from_pretrained: what the checkpoint says it is, the extra load kwargs (compressed-tensors is
    decompressed to float so every tool sees its weights), or a one-line refusal when this environment
    cannot load that quantization."""
    if gguf_path is not None:
        return from_gguf(gguf_path), {}
    cfg = read_config(src) or {}
    pq = from_config(cfg.get("quantization_config"))
    if pq is None:
        return None, {}
    missing = [p for p in NEEDS.get(pq.method, ()) if importlib.util.find_spec(p) is None]
    if missing:
        raise QuantbenchError(f"model '{spec}' is {pq.line().split(';')[0]}, and loading {pq.method} checkpoints needs "
                              f"{' and '.join(missing)} (not installed here)")
    if pq.method == "compressed-tensors":
        from transformers import CompressedTensorsConfig

        return pq, {"quantization_config": CompressedTensorsConfig(run_compressed=False)}
    return pq, {}


def after_load(model: nn.Module, pq: PreQuant | None, info: dict) -> PreQuant | None:
    """Mark the loaded model (quantized modules found on it count too) and add the one line to info."""
    mods = quantized_modules(model)
    if pq is None:  # e.g. a hub id, whose config.json was not readable before loading
        pq = from_config(getattr(getattr(model, "config", None), "quantization_config", None))
    if pq is None and mods:
        pq = PreQuant(next(iter(mods)), "", "quantized modules on the loaded model", kept=True)
    elif pq is not None and mods and not pq.kept:
        pq = PreQuant(pq.method, pq.detail, pq.source, kept=True)
    if pq is not None:
        model.__dict__[_ATTR] = pq
        info["prequant"] = pq.as_dict()
        info["caveat"] = "; ".join(x for x in (info.get("caveat"), pq.line()) if x)
    return pq


def of(model: nn.Module) -> PreQuant | None:
    return model.__dict__.get(_ATTR)


def check_recipe(model: nn.Module, recipe) -> None:
    """Refuse a recipe that would quantize a kept-quantized model (before any work)."""
    pq = of(model)
    if pq is None or not pq.kept or recipe.is_fp:
        return
    raise QuantbenchError(f"recipe '{recipe.name}': the model is already quantized ({pq.method}"
                          f"{', ' + pq.detail if pq.detail else ''}); quantizing it again is refused: evaluate "
                          "it as loaded (recipe 'as-loaded') or load its full-precision checkpoint")
