"""Proof that an export is the model we measured: reload it through the runtime's own loader and
compare with the simulated model.

- compressed-tensors: `AutoModelForCausalLM.from_pretrained(folder)` (transformers + compressed-tensors,
  default route: the weights are decompressed on the first forward pass and compressed-tensors' own
  quantized forward fake-quantizes the input activations with the stored static scales or dynamic
  per-token/per-tensor ranges; so on CPU the reloaded model runs weights AND activations as written).
- gguf: `from_pretrained(folder, gguf_file=name)` (transformers' GGUF loader dequantizes every tensor).

Criterion (`export_verified`): every weight the reloaded model holds equals the simulated one bit for bit
(torch.equal on each tensor of the simulated model's dense view: quantized linears' dequantized weights,
embeddings, norms, biases), AND the reloaded perplexity on the run's evaluation windows is within
VERIFY_PPL_TOL (0.5%) of the simulated one. max |Δlogit| between the two models on the same windows is
recorded beside them.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from ..quant.backends.gguf import GgufEmbedding
from ..quant.qlinear import QuantLinear

VERIFY_PPL_TOL = 0.005  # relative perplexity difference allowed between reloaded and simulated


def dense_view(model: nn.Module) -> dict[str, torch.Tensor]:
    """name -> the float tensor a runtime holds for it: QuantLinear/GgufEmbedding weights (dequantized),
    every other parameter and persistent buffer as is (tied tensors under each name)."""
    out: dict[str, torch.Tensor] = {}
    quantized = [n for n, m in model.named_modules() if isinstance(m, (QuantLinear, GgufEmbedding))]
    for mname, mod in model.named_modules():
        prefix = f"{mname}." if mname else ""
        if isinstance(mod, (QuantLinear, GgufEmbedding)):
            out[prefix + "weight"] = mod.weight
            if getattr(mod, "bias", None) is not None:
                out[prefix + "bias"] = mod.bias
            continue
        if any(mname.startswith(q + ".") for q in quantized):
            continue  # internals of a quantized module (e.g. an online transform)
        for n, p in mod.named_parameters(recurse=False):
            out[prefix + n] = p
        for n, b in mod.named_buffers(recurse=False):
            if b is not None and n not in mod._non_persistent_buffers_set:
                out[prefix + n] = b
    return out


@dataclass
class WeightCheck:
    compared: int
    equal: int
    missing: list[str] = field(default_factory=list)  # simulated tensors the reloaded model lacks
    mismatched: list[str] = field(default_factory=list)
    max_abs_diff: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.missing and not self.mismatched and self.compared > 0


@torch.no_grad()
def compare_weights(sim: nn.Module, reloaded: nn.Module) -> WeightCheck:
    """Every tensor of the simulated model's dense view against the reloaded model's tensor of that name."""
    got = dict(reloaded.named_parameters(remove_duplicate=False)) | dict(reloaded.named_buffers(remove_duplicate=False))
    check = WeightCheck(0, 0)
    for name, t in dense_view(sim).items():
        if not t.is_floating_point():
            continue  # e.g. GGUF bytes, integer buffers
        r = got.get(name)
        if r is None:
            check.missing.append(name)
            continue
        check.compared += 1
        a, b = t.detach().cpu(), r.detach().cpu()
        if a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b):
            check.equal += 1
        else:
            check.mismatched.append(name)
            if a.shape == b.shape:
                check.max_abs_diff = max(check.max_abs_diff, float((a.float() - b.float()).abs().max()))
    return check


class Tee(nn.Module):
    """Runs the reloaded model (whose outputs it returns) and the simulated one on the same ids, and
    keeps the largest |Δlogit| seen: one evaluation pass gives the reloaded perplexity and the gap."""

    def __init__(self, model: nn.Module, reference: nn.Module):
        super().__init__()
        self.model, self.reference = model, reference
        self.max_abs_diff = 0.0
        self.reference_seconds = 0.0

    def forward(self, input_ids: torch.Tensor, **kw):
        out = self.model(input_ids=input_ids, **kw)
        t0 = time.perf_counter()
        ref = self.reference(input_ids=input_ids, **kw).logits
        self.reference_seconds += time.perf_counter() - t0
        self.max_abs_diff = max(self.max_abs_diff, float((out.logits.float() - ref.float()).abs().max()))
        return out


def packed_asymmetric(folder: Path) -> bool:
    """Whether the checkpoint holds asymmetric pack-quantized weights (packed zero points)."""
    qc = json.loads((Path(folder) / "config.json").read_text()).get("quantization_config") or {}
    return any(g.get("format", qc.get("format")) == "pack-quantized" and not (g.get("weights") or {}).get("symmetric", True)
               for g in (qc.get("config_groups") or {}).values())


def reload_compressed(folder: Path, dtype: torch.dtype, attn: str | None, device: torch.device) -> nn.Module:
    """The folder as transformers loads it, decompressed. Default compressed-tensors route, except for
    asymmetric packed weights: transformers 5.24 builds the compressed layout on meta tensors, where
    compressed-tensors 0.20 leaves zero points unpacked, so the packed zero points of such a checkpoint
    (the layout the library's compressor writes and vLLM reads) do not fit; those load with
    CompressedTensorsConfig(dequantize=True), which decompresses every weight while loading (with the
    first config group's scheme: a mixed plan with asymmetric packed weights then fails verification)."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    kw = {"attn_implementation": attn} if attn else {}
    if packed_asymmetric(folder):
        kw["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, **kw).to(device).eval()
    with torch.no_grad():  # the first forward decompresses (compressed-tensors' hook); do it before timing
        model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device))
    return model


def reload_gguf(path: Path, dtype: torch.dtype, attn: str | None, device: torch.device) -> tuple[nn.Module, object]:
    from .gguf import load_gguf_back

    kw = {"attn_implementation": attn} if attn else {}
    model, tok = load_gguf_back(path, dtype, **kw)
    return model.to(device), tok


def tokenizer_matches(a, b, text: str) -> bool:
    """Both tokenizers give the same ids for `text` (a decoded evaluation window)."""
    return a(text, add_special_tokens=False)["input_ids"] == b(text, add_special_tokens=False)["input_ids"]
