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


MICRO_CT_FORMATS = ("nvfp4-pack-quantized", "mxfp4-pack-quantized", "mxfp8-quantized")


def _ct_groups(folder: Path) -> list[dict]:
    qc = json.loads((Path(folder) / "config.json").read_text()).get("quantization_config") or {}
    return [{**g, "format": g.get("format", qc.get("format"))} for g in (qc.get("config_groups") or {}).values()]


def dense_only(folder: Path, dtype: torch.dtype) -> str | None:
    """Why transformers' default compressed-tensors route cannot run this checkpoint in `dtype` (None if it can):
    compressed-tensors 0.20.1 decompresses NVFP4 / MX weights to bfloat16 whatever the model's dtype, and the first
    forward of a float32 (or float16) model then fails in the matmul ('expected m1 and m2 to have the same dtype')."""
    micro = sorted({g["format"] for g in _ct_groups(folder)} & set(MICRO_CT_FORMATS))
    if not micro or dtype == torch.bfloat16:
        return None
    return (f"transformers cannot run {'/'.join(micro)} in a {str(dtype).removeprefix('torch.')} model on CPU "
            "(compressed-tensors 0.20.1 decompresses them to bfloat16); loaded dense with "
            "CompressedTensorsConfig(dequantize=True)")


def stored_only(folder: Path) -> bool:
    """A dense reload (dense_only) cannot reproduce the measured model: quantized input activations (a dense
    model runs them in full precision) or NVFP4 weights (decompressed through bfloat16, not the run's dtype)."""
    return any(g.get("input_activations") or g["format"] == "nvfp4-pack-quantized" for g in _ct_groups(folder))


def kv_cache_check(folder: Path, sim: nn.Module, reloaded: nn.Module) -> dict:
    """Export columns for a checkpoint with kv_cache_scheme: the stored k_scale / v_scale against our calibrated
    ones (torch.equal), and whether the reload applies them (compressed-tensors 0.20.1 looks for
    `past_key_values` in the attention forward's signature; transformers 5.25 calls it `cache`, so the loader
    registers no k_scale and the reload runs an unquantized cache)."""
    from safetensors.torch import load_file

    from .compressed import kv_cache_tensors

    qc = json.loads((Path(folder) / "config.json").read_text()).get("quantization_config") or {}
    if not qc.get("kv_cache_scheme"):
        return {}
    stored = {k: v for f in Path(folder).glob("*.safetensors") for k, v in load_file(f).items()}
    ours = kv_cache_tensors(sim)
    equal = sum(k in stored and torch.equal(stored[k], v.cpu()) for k, v in ours.items())
    params = dict(reloaded.named_parameters())
    kept = sum(k in params and torch.equal(params[k].detach().cpu(), v.cpu()) for k, v in ours.items())
    note = None if kept == len(ours) else ("transformers' compressed-tensors loader did not apply kv_cache_scheme "
                                           "(no attention module with past_key_values in its signature): the "
                                           "reload runs an unquantized KV cache; the k/v scales are verified stored")
    return {"export_kv_scales_equal": f"{equal}/{len(ours)}", "export_kv_scales_reloaded": f"{kept}/{len(ours)}",
            "export_kv_note": note}


def _scheme_of(qc, name: str):
    """The config group scheme that targets module `name` (exact names win over the class name 'Linear')."""
    groups = list(qc.config_groups.values())
    return next((s for s in groups if name in s.targets), None) or next(s for s in groups if "Linear" in s.targets)


def library_weight(sd: dict[str, torch.Tensor], scheme, dtype: torch.dtype) -> torch.Tensor:
    """One module's stored tensors decompressed by compressed-tensors: its compressor's decompress, except that
    NVFP4's e2m1 codes and fp8 scales are unpacked into `dtype` (the library's unpack_fp4_from_uint8 and
    dequantize, as its decompress does, which fixes bfloat16) so that a float32 run is compared in float32."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    compressor = BaseCompressor.get_value_from_registry(scheme.format)
    if scheme.format != "nvfp4-pack-quantized":
        return compressor.decompress(dict(sd), scheme)["weight"].to(dtype)
    m, n = sd["weight_packed"].shape
    codes = unpack_fp4_from_uint8(sd["weight_packed"], m, n * 2, dtype=dtype)
    return dequantize(x_q=codes, scale=sd["weight_scale"].to(dtype), args=scheme.weights,
                      global_scale=sd["weight_global_scale"], dtype=dtype)


@torch.no_grad()
def compare_stored(folder: Path, sim: nn.Module) -> WeightCheck:
    """Every quantized linear's stored tensors, decompressed by compressed-tensors (library_weight), against the
    simulated model's dequantized weight (torch.equal); the model's other tensors against the safetensors file."""
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    qc = QuantizationConfig.model_validate(json.loads((Path(folder) / "config.json").read_text())["quantization_config"])
    stored: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        stored.update(load_file(str(f)))
    check = WeightCheck(0, 0)
    quantized = {n: m for n, m in sim.named_modules() if isinstance(m, QuantLinear) and m.qweight is not None}
    for name, t in dense_view(sim).items():
        mod = name.rpartition(".")[0]
        if mod in quantized and name.endswith(".weight"):
            sd = {k.removeprefix(mod + "."): v for k, v in stored.items() if k.startswith(mod + ".")}
            got = library_weight(sd, _scheme_of(qc, mod), t.dtype)
        else:
            got = stored.get(name)
            if got is None and t.is_floating_point():
                continue  # a tied tensor stored once under its other name; compared there
        if got is None or not t.is_floating_point():
            continue
        check.compared += 1
        if got.shape == t.shape and got.dtype == t.dtype and torch.equal(got, t.detach().cpu()):
            check.equal += 1
        else:
            check.mismatched.append(name)
    return check


def reload_compressed(folder: Path, dtype: torch.dtype, attn: str | None, device: torch.device) -> nn.Module:
    """The folder as transformers loads it, decompressed. Default compressed-tensors route, except for
    asymmetric packed weights: transformers 5.24 builds the compressed layout on meta tensors, where
    compressed-tensors 0.20 leaves zero points unpacked, so the packed zero points of such a checkpoint
    (the layout the library's compressor writes and vLLM reads) do not fit; those load with
    CompressedTensorsConfig(dequantize=True), which decompresses every weight while loading (with the
    first config group's scheme: a mixed plan with asymmetric packed weights then fails verification). NVFP4 / MX
    checkpoints in a model that is not bfloat16 load the same way (dense_only)."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    kw = {"attn_implementation": attn} if attn else {}
    if packed_asymmetric(folder) or dense_only(folder, dtype):
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
