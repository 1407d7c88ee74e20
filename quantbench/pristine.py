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
  the model's own safetensors file where that tensor is stored there and reads back equal (nothing
  is held in memory: one tensor at a time is read on restore), and a CPU clone otherwise (tensors
  the file does not hold, GGUF-dequantized weights, renamed or converted tensors).
Parameters on the meta device (accelerate offload: their values live in the offload map, which a
recipe never writes) are left alone.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

_DICT_ATTRS = ("_modules", "_parameters", "_buffers", "_non_persistent_buffers_set", "_forward_pre_hooks",
               "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
               "_forward_hooks_always_called", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
               "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


def copy_module_dict(d: dict) -> dict:
    """A module's __dict__ one level deep: its own dictionaries and sets copied, values shared."""
    return {k: (copy.copy(v) if k in _DICT_ATTRS else v) for k, v in d.items()}


@dataclass
class _Value:
    """Where a tensor's pristine value comes from: (file, key) or a CPU clone."""

    tensor: torch.Tensor  # the model's own tensor object (Parameter or buffer)
    shape: torch.Size
    dtype: torch.dtype
    device: torch.device
    file: Path | None = None
    key: str | None = None
    clone: torch.Tensor | None = None


def safetensors_index(folder: Path | None) -> dict[str, Path]:
    """tensor name -> the safetensors file in `folder` that stores it (empty when there is none)."""
    if folder is None or not Path(folder).is_dir():
        return {}
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return {k: folder / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    out = {}
    from safetensors import safe_open

    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            out.update({k: f for k in sf.keys()})
    return out


class Pristine:
    """capture(model) once; restore() after each recipe puts the model back exactly (see the module doc)."""

    def __init__(self, model: nn.Module, folder: Path | None = None):
        self.model = model
        self.modules = {id(m): (m, copy_module_dict(m.__dict__)) for m in model.modules()}
        self.config = copy.deepcopy(model.config.__dict__) if hasattr(model, "config") else None
        self.values: list[_Value] = []
        self.file_bytes = self.clone_bytes = 0
        self._capture_values(safetensors_index(folder))

    @torch.no_grad()
    def _capture_values(self, files: dict[str, Path]) -> None:
        names: dict[int, list[str]] = {}
        tensors: dict[int, torch.Tensor] = {}
        for prefix, m in self.model.named_modules(remove_duplicate=False):
            for n, t in [*m._parameters.items(), *m._buffers.items()]:
                if t is not None and t.device.type != "meta":
                    tensors[id(t)] = t
                    names.setdefault(id(t), []).append(f"{prefix}.{n}" if prefix else n)
        from safetensors import safe_open

        handles = {}
        try:
            for i, t in tensors.items():
                v = _Value(t, t.shape, t.dtype, t.device)
                key = next((n for n in names[i] if n in files), None)
                if key is not None:
                    f = files[key]
                    sf = handles.get(f) or handles.setdefault(f, safe_open(str(f), framework="pt"))
                    stored = sf.get_tensor(key)
                    if stored.shape == t.shape and torch.equal(stored.to(t.dtype), t.detach().cpu()):
                        v.file, v.key = f, key
                if v.file is None:
                    v.clone = t.detach().to("cpu", copy=True)
                    self.clone_bytes += t.numel() * t.element_size()
                else:
                    self.file_bytes += t.numel() * t.element_size()
                self.values.append(v)
        finally:
            handles.clear()

    @torch.no_grad()
    def restore(self) -> None:
        """Structure, config and every value back to what capture() saw."""
        for m, saved in self.modules.values():
            m.__dict__.clear()
            m.__dict__.update(copy_module_dict(saved))
        if self.config is not None:
            cfg = self.model.config
            cfg.__dict__.clear()
            cfg.__dict__.update(copy.deepcopy(self.config))
        from safetensors import safe_open

        handles = {}
        for v in self.values:
            if v.file is not None:
                sf = handles.get(v.file) or handles.setdefault(v.file, safe_open(str(v.file), framework="pt"))
                src = sf.get_tensor(v.key)
            else:
                src = v.clone
            t = v.tensor
            if t.shape == v.shape and t.dtype == v.dtype and t.device == v.device:
                t.copy_(src)
            else:  # the recipe replaced the tensor's data (other shape, dtype or device)
                t.data = src.to(device=v.device, dtype=v.dtype, copy=True)


__all__ = ["Pristine", "safetensors_index"]
