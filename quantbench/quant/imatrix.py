"""Importance matrix from our calibration set, in llama.cpp's imatrix file format (GGUF).

Definition (llama.cpp tools/imatrix/imatrix.cpp, IMatrixCollector::collect_imatrix): for every weight
`blk.*` that multiplies an activation, `in_sum2[j]` = Σ over every token of x_j² (x: the matmul's input row,
j: input column) and `counts` = the number of tokens; llama-quantize weighs each column's rounding error by
in_sum2 / counts. The file (IMatrixCollector::save_imatrix): general.type = "imatrix",
imatrix.datasets (strings), imatrix.chunk_count and imatrix.chunk_size (u32), and per weight, in sorted
name order, the F32 tensors `<name>.in_sum2` (ne = [n_in, 1]) and `<name>.counts` (ne = [1, 1]).

Ours runs the FP model in torch over the calibration batches (llama.cpp runs its own forward and skips
batches under 16 tokens; ours are whole calibration sequences). Sums are float64 here, float32 in the file.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..core.errors import QuantbenchError
from ..core.hooks import input_hooks
from ..modeling.surgery import no_cache


@dataclass
class ImatrixEntry:
    sum2: torch.Tensor  # [in] float64: Σ x_j² over tokens
    count: int  # tokens


def _gguf_weight_names(model: nn.Module) -> dict[str, str]:
    """HF module name -> GGUF weight name for the decoder layers' linears (llama.cpp collects `blk.*` only)."""
    import gguf

    from .gguf_model import model_arch

    arch = model_arch(model)
    n_layers = model.config.num_hidden_layers
    table = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.gguf_arch.upper()], n_layers)
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and re.search(r"\.\d+\.", name):
            g = table.get_name(name)
            if g is None:
                raise QuantbenchError(f"imatrix: no GGUF name for {name}")
            out[name] = f"{g}.weight"
    return out


@torch.no_grad()
def collect_imatrix(model: nn.Module, batches: torch.Tensor, batch_size: int = 4) -> dict[str, ImatrixEntry]:
    """GGUF weight name -> Σx² per input column and token count, over `batches` ([N, T] token ids)."""
    names = _gguf_weight_names(model)
    mods = {n: model.get_submodule(n) for n in names}
    acc: dict[str, ImatrixEntry] = {}

    def add(name: str, x: torch.Tensor) -> None:  # x [tokens, in]
        e = acc.setdefault(name, ImatrixEntry(torch.zeros(x.shape[1], dtype=torch.float64), 0))
        e.sum2 += x.double().pow(2).sum(0).cpu()
        e.count += x.shape[0]

    device = next(model.parameters()).device
    with input_hooks(mods, add) as aliases:
        for i in range(0, len(batches), batch_size):
            model(input_ids=batches[i: i + batch_size].to(device), **no_cache(model))
    for name, first in aliases.items():  # q/k/v (and gate/up) read the same input: the same statistics
        acc[name] = acc[first]
    return {names[n]: acc[n] for n in names if n in acc}


def write_imatrix(path: str | Path, entries: dict[str, ImatrixEntry], dataset: str, chunk_size: int) -> Path:
    """Write `entries` as llama.cpp's GGUF imatrix file (chunk_count = tokens / chunk_size, as llama.cpp counts)."""
    import gguf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(path, arch="")
    w.kv_data[0].pop("general.architecture", None)  # llama.cpp's imatrix file has none
    w.add_type("imatrix")
    w.add_array("imatrix.datasets", [dataset])
    tokens = max((e.count for e in entries.values()), default=0)
    w.add_uint32("imatrix.chunk_count", tokens // chunk_size)
    w.add_uint32("imatrix.chunk_size", chunk_size)
    for name in sorted(entries):
        e = entries[name]
        w.add_tensor(f"{name}.in_sum2", e.sum2.numpy().astype(np.float32).reshape(1, -1))  # ne = [in, 1]
        w.add_tensor(f"{name}.counts", np.array([[e.count]], dtype=np.float32))  # ne = [1, 1]
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
