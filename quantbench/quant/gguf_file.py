"""GGUF file pieces shared by the exporter (quantbench.export.gguf, tokenizer included) and the llama.cpp
backend (quantbench.quant.backends.llamacpp, which hands llama.cpp's quantizer a weights-only F32/F16 file):
the metadata llama.cpp's converter writes, each tensor's table entry and data.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .gguf_model import GgufArch, GgufTensor, gguf_plan, head_dim, model_arch, rope_theta, to_llama_cpp_layout
from .gguf_quant import gguf_quantize, stored_nbytes


def file_type(plan: list[GgufTensor]) -> int:
    """general.file_type: the most common type among 2-D weights (llama.cpp's 'mostly X')."""
    from gguf import LlamaFileType

    counts = Counter(e.qtype for e in plan if len(e.shape) >= 2)
    top = counts.most_common(1)[0][0] if counts else "F32"
    special = {"F32": "ALL_F32", "MXFP4": "MOSTLY_MXFP4_MOE"}
    return LlamaFileType[special.get(top, f"MOSTLY_{top}")]


def model_name(model: torch.nn.Module) -> str:
    name = str(getattr(model.config, "_name_or_path", "") or "model")
    return Path(name).name or "model"


def add_metadata(w, model: torch.nn.Module, arch: GgufArch, plan: list[GgufTensor], name: str | None) -> None:
    """general.* and {arch}.* hyperparameters, as llama.cpp's converter writes them."""
    import gguf

    cfg = model.config
    w.add_name(name or model_name(model))
    w.add_type("model")
    w.add_file_type(file_type(plan))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
    w.add_rope_freq_base(rope_theta(cfg))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    if arch.rope_dims:
        w.add_rope_dimension_count(head_dim(cfg))
    if getattr(cfg, "head_dim", None):
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)


def tensor_info(entry: GgufTensor) -> tuple[tuple[int, ...], np.dtype, int, object]:
    """(shape as the writer wants it, numpy dtype, bytes, raw ggml type or None) for one tensor."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    nbytes = stored_nbytes(entry.shape, entry.qtype)
    if entry.qtype in ("F32", "F16"):
        return entry.shape, np.dtype(np.float32 if entry.qtype == "F32" else np.float16), nbytes, None
    t = GGMLQuantizationType[entry.qtype]
    block, type_size = GGML_QUANT_SIZES[t]
    byte_shape = (*entry.shape[:-1], entry.shape[-1] // block * type_size)  # [out, in/block*bytes]
    return byte_shape, np.dtype(np.uint8), nbytes, t


def tensor_data(model_state: dict[str, torch.Tensor], entry: GgufTensor) -> np.ndarray:
    w = to_llama_cpp_layout(model_state[entry.hf_name], entry)
    return gguf_quantize(w, entry.qtype, entry.hf_name)


@torch.no_grad()
def write_gguf_file(model: torch.nn.Module, path: str | Path, plan: list[GgufTensor], name: str | None = None,
                    extra: Callable[[object], None] | None = None) -> None:
    """Write `model`'s tensors as `plan` (gguf_plan) types them, with the converter's metadata; `extra(writer)`
    adds more key/values (the exporter's tokenizer). Streams one tensor at a time; no half-written file."""
    import gguf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arch = model_arch(model)
    writer = gguf.GGUFWriter(path, arch.gguf_arch)
    add_metadata(writer, model, arch, plan, name)
    if extra is not None:
        extra(writer)
    for entry in plan:
        shape, dtype, nbytes, raw = tensor_info(entry)
        writer.add_tensor_info(entry.gguf_name, shape, dtype, nbytes, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    state = model.state_dict()
    try:
        for entry in plan:
            writer.write_tensor_data(tensor_data(state, entry))
    except BaseException:
        writer.close()
        path.unlink(missing_ok=True)
        raise
    writer.close()


def no_vocab(writer) -> None:
    """tokenizer.ggml.model = "none": llama.cpp's vocabulary-less model type, so llama.cpp loads a
    weights-only file and decodes token ids (llama_cpp_check scores the quantized file on our windows)."""
    writer.add_tokenizer_model("none")


def write_weights_gguf(model: torch.nn.Module, path: str | Path, default_qtype: str = "F32") -> list[GgufTensor]:
    """`model`'s weights and hyperparameters (no tokenizer: `no_vocab`), 2-D weights in `default_qtype` and
    1-D tensors F32: the input llama.cpp's `llama_model_quantize` reads. Returns the file's plan."""
    plan = gguf_plan(model, None, default_qtype)
    write_gguf_file(model, path, plan, extra=no_vocab)
    return plan
