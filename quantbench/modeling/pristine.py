"""The model as loaded, kept once, and put back exactly between recipes (instead of a deep copy of the
whole model per recipe).

A recipe changes the working model in place (quant/effects.py lists what a mitigation may do): it
writes weights (scaling, rotation, GPTQ), replaces modules (QuantLinear, backends' modules, MoE
expert lists), unties lm_head (a new Parameter, `config.tie_word_embeddings`), adds submodules and
buffers (online transforms), and registers hooks (outlier tokens, online transforms). `Pristine`
undoes all of it without knowing which mitigation ran:

- structure: for every module of the loaded model, its own `__dict__` (children, parameters,
  buffers, hook dictionaries, plain attributes such as accelerate's `_hf_hook`) is copied one level
  deep and put back, so replaced modules, untied or added parameters and every hook disappear and
  the original objects (ties included) return;
- config: the model config's attributes are put back;
- values: every parameter and buffer is written back in place from its pristine copy. The copy is
  the model's own safetensors file where that tensor is stored there and reads back equal (the same
  bytes, compared a piece at a time; values, when the model converted the dtype): nothing is
  held in memory, and restore reads it with plain file reads (no memory map, whose pages would count
  as resident) straight into the parameter's storage when dtype and device match. Other tensors
  (not in the file, GGUF-dequantized, renamed or converted on load, or a model on a GPU whose file
  dtype differs) are kept as a CPU clone.
Parameters on the meta device (accelerate offload: their values live in the offload map, which a
recipe never writes) are left alone.
"""
from __future__ import annotations

import copy
import json
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from .memory import CHUNK_BYTES
from .surgery import on_replace

_DICT_ATTRS = ("_modules", "_parameters", "_buffers", "_non_persistent_buffers_set", "_forward_pre_hooks",
               "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
               "_forward_hooks_always_called", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
               "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


def copy_module_dict(d: dict) -> dict:
    """A module's __dict__ one level deep: its own dictionaries and sets copied, values shared."""
    return {k: (copy.copy(v) if k in _DICT_ATTRS else v) for k, v in d.items()}


@dataclass
class _Value:
    """Where a tensor's pristine value comes from: the model's file or a CPU clone."""

    tensor: torch.Tensor  # the model's own tensor object (Parameter or buffer)
    shape: torch.Size
    dtype: torch.dtype
    device: torch.device
    stored: "Stored | None" = None  # its copy in the model's safetensors file
    clone: torch.Tensor | None = None


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


@dataclass(frozen=True)
class Stored:
    """One tensor in a safetensors file: where its bytes are, its dtype and shape."""

    file: Path
    offset: int  # absolute byte offset in the file
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    def read(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor, read with plain file reads (no memory map: nothing of the file stays resident).
        out: a contiguous CPU tensor of this dtype and shape to read into (else a new one)."""
        t = out if out is not None else torch.empty(self.shape, dtype=self.dtype)
        view = memoryview(t.view(torch.uint8).reshape(-1).numpy()) if t.numel() else memoryview(b"")
        with open(self.file, "rb", buffering=0) as f:
            f.seek(self.offset)
            self._fill(f, view)
        return t

    def _fill(self, f, view: memoryview) -> None:
        got = 0
        while got < len(view):
            k = f.readinto(view[got:])
            if not k:
                raise OSError(f"{self.file} is shorter than its header says (tensor at byte {self.offset})")
            got += k

    def holds(self, t: torch.Tensor) -> bool:
        """Whether t's values are this tensor's. Same dtype on the CPU: its bytes equal the file's, compared
        CHUNK_BYTES at a time (the check costs one piece of memory, not one tensor). Otherwise: the file's
        values converted to t's dtype equal t's (torch.equal)."""
        if tuple(t.shape) != self.shape:
            return False
        if t.device.type != "cpu" or t.dtype != self.dtype or not t.is_contiguous():
            return torch.equal(self.read().to(t.dtype), t.detach().cpu())
        mine = t.detach().reshape(-1).view(torch.uint8)
        buf = torch.empty(min(CHUNK_BYTES, self.nbytes), dtype=torch.uint8)
        with open(self.file, "rb", buffering=0) as f:
            f.seek(self.offset)
            for a in range(0, self.nbytes, CHUNK_BYTES):
                piece = buf[: min(CHUNK_BYTES, self.nbytes - a)]
                self._fill(f, memoryview(piece.numpy()))
                if not torch.equal(piece, mine[a: a + len(piece)]):
                    return False
        return True


def safetensors_index(folder: Path | None) -> dict[str, Stored]:
    """tensor name -> where a safetensors file in `folder` stores it (empty when there is none, or a
    file uses a dtype not listed above)."""
    if folder is None or not Path(folder).is_dir():
        return {}
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        for k, v in header.items():
            if k == "__metadata__" or v["dtype"] not in _DTYPES:
                continue
            b, e = v["data_offsets"]
            out[k] = Stored(f, 8 + n + b, e - b, _DTYPES[v["dtype"]], tuple(v["shape"]))
    return out


def _weak_release(pr: "Pristine"):
    """pr._release without a strong reference (the registry would otherwise keep pr and its model alive)."""
    ref = weakref.ref(pr)

    def release(model: nn.Module, old: nn.Module) -> None:
        p = ref()
        if p is not None:
            p._release(model, old)
    return release


class Pristine:
    """capture(model) once; restore() after each recipe puts the model back exactly (see the module doc)."""

    def __init__(self, model: nn.Module, folder: Path | None = None):
        self.model = model
        self.modules = {id(m): (m, copy_module_dict(m.__dict__)) for m in model.modules()}
        self.config = copy.deepcopy(model.config.__dict__) if hasattr(model, "config") else None
        self.values: list[_Value] = []
        self.file_bytes = self.clone_bytes = 0
        self._capture_values(safetensors_index(folder))
        self._ids = {id(v.tensor) for v in self.values}
        self.released_bytes = 0  # storage freed from replaced modules during the current recipe
        on_replace(model, _weak_release(self))

    def _release(self, model: nn.Module, old: nn.Module) -> None:
        """A module the recipe replaced: free its captured tensors that the model no longer reaches
        (restore reads them back), so the working model and the replaced weights are not held together."""
        mine = [t for t in [*old.parameters(), *old.buffers()] if id(t) in self._ids and t.numel()]
        if not mine:
            return
        reached = {id(t) for t in [*model.parameters(), *model.buffers()]}
        for t in mine:
            if id(t) not in reached:
                self.released_bytes += t.numel() * t.element_size()
                t.data = torch.empty(0, dtype=t.dtype, device=t.device)

    @torch.no_grad()
    def _capture_values(self, files: dict[str, Stored]) -> None:
        names: dict[int, list[str]] = {}
        tensors: dict[int, torch.Tensor] = {}
        for prefix, m in self.model.named_modules(remove_duplicate=False):
            for n, t in [*m._parameters.items(), *m._buffers.items()]:
                if t is not None and t.device.type != "meta":
                    tensors[id(t)] = t
                    names.setdefault(id(t), []).append(f"{prefix}.{n}" if prefix else n)
        for i, t in tensors.items():
            v = _Value(t, t.shape, t.dtype, t.device)
            key = next((n for n in names[i] if n in files), None)
            if key is not None and files[key].holds(t):
                v.stored = files[key]
            if v.stored is None:
                v.clone = t.detach().to("cpu", copy=True)
                self.clone_bytes += t.numel() * t.element_size()
            else:
                self.file_bytes += t.numel() * t.element_size()
            self.values.append(v)

    @torch.no_grad()
    def restore(self) -> None:
        """Structure, config and every value back to what capture() saw."""
        self.released_bytes = 0
        for m, saved in self.modules.values():
            m.__dict__.clear()
            m.__dict__.update(copy_module_dict(saved))
        if self.config is not None:
            cfg = self.model.config
            cfg.__dict__.clear()
            cfg.__dict__.update(copy.deepcopy(self.config))
        for v in self.values:
            t = v.tensor
            same = t.shape == v.shape and t.dtype == v.dtype and t.device == v.device
            if v.stored is not None and same and t.device.type == "cpu" and t.dtype == v.stored.dtype \
                    and t.is_contiguous():
                v.stored.read(out=t.data)  # straight into the model's own storage
                continue
            if v.stored is not None and v.device.type == "cpu" and v.dtype == v.stored.dtype:
                t.data = v.stored.read()  # released storage: a fresh tensor read from the file
                continue
            src = v.stored.read() if v.stored is not None else v.clone
            if same:
                t.copy_(src)
            else:  # the recipe replaced the tensor's data (other shape, dtype or device)
                t.data = src.to(device=v.device, dtype=v.dtype, copy=True)


__all__ = ["Pristine", "safetensors_index"]
