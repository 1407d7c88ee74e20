"""Write a Hugging Face Llama-family model as a GGUF file (llama.cpp and transformers read it), and
load it back through transformers' own GGUF loader.

    plan = simulate_gguf_(model, qtypes)              # what we measure ...
    info = write_gguf(model, tok, "m.gguf", qtypes)   # ... is what we ship
    reloaded, tok2 = load_gguf_back("m.gguf")         # weights equal the simulated ones exactly

Writing streams one tensor at a time (header and tensor table first, then each tensor quantized and
written), so memory stays at one tensor beyond the model.
"""
from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..quant.gguf_model import GgufArch, GgufTensor, gguf_plan, head_dim, model_arch, rope_theta, to_llama_cpp_layout
from ..quant.gguf_quant import FLOAT_TYPES, gguf_quantize, stored_nbytes
from .gguf_vocab import GgufVocab, add_vocab, vocab_from_tokenizer


@dataclass
class GgufExport:
    path: Path
    nbytes: int  # file size
    seconds: float  # quantize + write
    file_type: str  # general.file_type name, e.g. MOSTLY_Q4_0
    tensor_types: dict[str, int]  # qtype -> number of tensors
    tokenizer_pre: str | None
    warnings: list[str] = field(default_factory=list)


def _file_type(plan: list[GgufTensor]) -> int:
    """general.file_type: the most common type among 2-D weights (llama.cpp's 'mostly X')."""
    from gguf import LlamaFileType

    counts = Counter(e.qtype for e in plan if len(e.shape) >= 2)
    top = counts.most_common(1)[0][0] if counts else "F32"
    special = {"F32": "ALL_F32", "MXFP4": "MOSTLY_MXFP4_MOE"}
    return LlamaFileType[special.get(top, f"MOSTLY_{top}")]


def _model_name(model: torch.nn.Module) -> str:
    name = str(getattr(model.config, "_name_or_path", "") or "model")
    return Path(name).name or "model"


def _add_metadata(w, model: torch.nn.Module, arch: GgufArch, plan: list[GgufTensor], name: str | None) -> None:
    """general.* and {arch}.* hyperparameters, as llama.cpp's converter writes them."""
    import gguf

    cfg = model.config
    w.add_name(name or _model_name(model))
    w.add_type("model")
    w.add_file_type(_file_type(plan))
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


def _tensor_info(entry: GgufTensor) -> tuple[tuple[int, ...], np.dtype, int, object]:
    """(shape as the writer wants it, numpy dtype, bytes, raw ggml type or None) for one tensor."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    nbytes = stored_nbytes(entry.shape, entry.qtype)
    if entry.qtype in ("F32", "F16"):
        return entry.shape, np.dtype(np.float32 if entry.qtype == "F32" else np.float16), nbytes, None
    t = GGMLQuantizationType[entry.qtype]
    block, type_size = GGML_QUANT_SIZES[t]
    byte_shape = (*entry.shape[:-1], entry.shape[-1] // block * type_size)  # [out, in/block*bytes]
    return byte_shape, np.dtype(np.uint8), nbytes, t


def _tensor_data(model_state: dict[str, torch.Tensor], entry: GgufTensor) -> np.ndarray:
    w = to_llama_cpp_layout(model_state[entry.hf_name], entry)
    return gguf_quantize(w, entry.qtype, entry.hf_name)


@torch.no_grad()
def write_gguf(model: torch.nn.Module, tokenizer, path: str | Path, qtypes: Mapping[str, str] | None = None,
               default_qtype: str = "F16", name: str | None = None, pre: str | None = None) -> GgufExport:
    """Write `model` (+ `tokenizer`) to `path` as GGUF; weights typed as `gguf_plan` says.

    `qtypes` maps HF parameter (or module) names to GGUF types; other 2-D weights get `default_qtype`,
    1-D tensors F32. `pre` overrides the detected BPE pre-tokenizer name. Refuses (one line) what the
    file cannot express faithfully (see gguf_model.check_config).
    """
    import gguf

    t0 = time.perf_counter()
    arch = model_arch(model)
    plan = gguf_plan(model, qtypes, default_qtype)
    vocab: GgufVocab = vocab_from_tokenizer(tokenizer, model.config.vocab_size, pre)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(path, arch.gguf_arch)
    _add_metadata(writer, model, arch, plan, name)
    add_vocab(writer, vocab)
    for entry in plan:
        shape, dtype, nbytes, raw = _tensor_info(entry)
        writer.add_tensor_info(entry.gguf_name, shape, dtype, nbytes, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    state = model.state_dict()
    try:
        for entry in plan:
            writer.write_tensor_data(_tensor_data(state, entry))
    except BaseException:
        writer.close()
        path.unlink(missing_ok=True)  # no half-written file
        raise
    writer.close()
    return GgufExport(path=path, nbytes=path.stat().st_size, seconds=time.perf_counter() - t0,
                      file_type=gguf.LlamaFileType(_file_type(plan)).name,
                      tensor_types=dict(Counter(e.qtype for e in plan)), tokenizer_pre=vocab.pre,
                      warnings=list(vocab.warnings))


def load_gguf_back(path: str | Path, dtype: torch.dtype = torch.float32, **kwargs) -> tuple[torch.nn.Module, object]:
    """(model, tokenizer) as transformers loads the file: from_pretrained(folder, gguf_file=name);
    kwargs go to from_pretrained (e.g. attn_implementation)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model.eval(), tokenizer


__all__ = ["FLOAT_TYPES", "GgufExport", "load_gguf_back", "write_gguf"]
