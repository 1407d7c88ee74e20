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

import torch

from ..quant.gguf_file import file_type as _file_type
from ..quant.gguf_file import write_gguf_file
from ..quant.gguf_model import gguf_plan
from ..quant.gguf_quant import FLOAT_TYPES
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
    plan = gguf_plan(model, qtypes, default_qtype)
    vocab: GgufVocab = vocab_from_tokenizer(tokenizer, model.config.vocab_size, pre)
    path = Path(path)
    write_gguf_file(model, path, plan, name, extra=lambda writer: add_vocab(writer, vocab))
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
