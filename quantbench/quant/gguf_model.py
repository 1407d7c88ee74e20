"""Which tensors a GGUF file of a Hugging Face model holds, under which names and types.

Architecture knowledge is data (`ARCHS`): the GGUF architecture name, whether llama.cpp permutes
q/k rows for its rope layout, and the config checks that keep the file faithful. Tensor names come
from the gguf package's own HF -> GGUF name table (the table transformers' loader inverts).
`gguf_plan` is the single source of truth shared by the simulation (`simulate_gguf_`) and the
writer, so the simulated weights are exactly the ones written.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..core.errors import QuantbenchError, UnsupportedArchitecture
from .gguf_quant import block_size, check_qtype, gguf_fake_quant, stored_nbytes


@dataclass(frozen=True)
class GgufArch:
    gguf_arch: str  # general.architecture
    permute_qk: bool  # llama.cpp's LlamaModel.permute on q/k rows (undone by transformers on load)
    rope_dims: bool  # write {arch}.rope.dimension_count (transformers reads it as head_dim for llama)
    biases: bool  # q/k/v biases expected (qwen2) rather than refused


ARCHS: dict[str, GgufArch] = {
    "llama": GgufArch("llama", permute_qk=True, rope_dims=True, biases=False),
    "mistral": GgufArch("llama", permute_qk=True, rope_dims=True, biases=False),  # llama.cpp writes Mistral as llama
    "qwen2": GgufArch("qwen2", permute_qk=False, rope_dims=False, biases=True),
}


@dataclass(frozen=True)
class GgufTensor:
    """One tensor of the file."""

    hf_name: str  # state_dict key: model.layers.0.self_attn.q_proj.weight
    gguf_name: str  # blk.0.attn_q.weight
    qtype: str  # F32 | F16 | BF16 | Q8_0 | Q4_0 | ...
    shape: tuple[int, ...]  # torch order [out, in]
    rope_heads: int | None = None  # rows permuted into llama.cpp's rope layout with this many heads


def model_arch(model: torch.nn.Module) -> GgufArch:
    mt = getattr(model.config, "model_type", None)
    if mt not in ARCHS:
        raise UnsupportedArchitecture(f"GGUF export supports {', '.join(sorted(ARCHS))} models; this one is {mt!r}")
    return ARCHS[mt]


def rope_theta(config) -> float:
    """Rope base, refusing rope scaling the GGUF loaders here would drop (one line)."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    params = params if isinstance(params, dict) else {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        raise QuantbenchError(f"GGUF export: rope type {kind!r} (rope scaling) is not supported, only 'default'")
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    return float(theta if theta is not None else getattr(config, "rope_theta", 10000.0))


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def check_config(model: torch.nn.Module, arch: GgufArch) -> None:
    """Refuse (one line) what the file or transformers' GGUF loader would silently lose."""
    cfg = model.config
    rope_theta(cfg)
    if not arch.biases and (getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False)):
        raise QuantbenchError("GGUF export: Llama with attention/MLP biases is not supported (the loaders drop them)")
    if cfg.model_type == "mistral" and getattr(cfg, "sliding_window", None):
        raise QuantbenchError("GGUF export: Mistral with a sliding window is not supported (written as llama)")
    if not arch.rope_dims and head_dim(cfg) != cfg.hidden_size // cfg.num_attention_heads:
        raise QuantbenchError(f"GGUF export: {cfg.model_type} with head_dim != hidden_size / heads is not supported")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise QuantbenchError(f"GGUF export: activation {cfg.hidden_act!r} is not supported (llama.cpp uses silu)")


def _tied(model: torch.nn.Module) -> bool:
    out, emb = model.get_output_embeddings(), model.get_input_embeddings()
    return out is not None and out.weight is emb.weight


def _lookup(qtypes: Mapping[str, str], *names: str) -> str | None:
    """The qtype given for any of `names` (with or without the '.weight' suffix)."""
    found = {qtypes[k] for n in names for k in (n, n.removesuffix(".weight")) if k in qtypes}
    if len(found) > 1:
        raise QuantbenchError(f"conflicting GGUF types {sorted(found)} for the tied weight {' / '.join(names)}")
    return found.pop() if found else None


def gguf_plan(model: torch.nn.Module, qtypes: Mapping[str, str] | None = None,
              default_qtype: str = "F16") -> list[GgufTensor]:
    """Every tensor the GGUF file holds: 1-D tensors (norms, biases) F32 as llama.cpp keeps them,
    2-D weights `qtypes[name]` (HF parameter or module name) else `default_qtype`.

    A tied lm_head is not written (the loaders re-tie it to token_embd); its type is the embedding's.
    """
    import gguf

    arch = model_arch(model)
    check_config(model, arch)
    cfg = model.config
    qtypes = dict(qtypes or {})
    default_qtype = check_qtype(default_qtype)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.gguf_arch.upper()], cfg.num_hidden_layers)
    tied, used, plan = _tied(model), set(), []
    emb_name = next(n for n, p in model.named_parameters() if p is model.get_input_embeddings().weight)
    for hf_name, t in model.state_dict().items():
        if tied and hf_name.startswith("lm_head."):
            continue
        base, _, suffix = hf_name.rpartition(".")
        gname = names.get_name(base)
        if gname is None:
            raise QuantbenchError(f"GGUF export: no GGUF name for tensor {hf_name!r} ({arch.gguf_arch})")
        aliases = (hf_name, "lm_head.weight") if tied and hf_name == emb_name else (hf_name,)
        given = _lookup(qtypes, *aliases)
        used.update(k for a in aliases for k in (a, a.removesuffix(".weight")))
        qtype = "F32" if t.ndim < 2 else check_qtype(given or default_qtype)
        if t.shape[-1] % block_size(qtype):
            raise QuantbenchError(f"{hf_name}: row length {t.shape[-1]} is not a multiple of the GGUF "
                                  f"{qtype} block size {block_size(qtype)}")
        heads = None
        if arch.permute_qk and base.endswith(("q_proj", "k_proj")):
            heads = cfg.num_attention_heads if base.endswith("q_proj") else cfg.num_key_value_heads
        plan.append(GgufTensor(hf_name, f"{gname}.{suffix}", qtype, tuple(t.shape), heads))
    unknown = sorted(set(qtypes) - used)
    if unknown:
        raise QuantbenchError(f"GGUF types given for unknown weights: {', '.join(unknown[:3])}")
    return plan


def plan_nbytes(plan: list[GgufTensor]) -> int:
    """Tensor bytes of the file (without metadata and alignment padding)."""
    return sum(stored_nbytes(e.shape, e.qtype) for e in plan)


def llama_cpp_qtypes(model: torch.nn.Module, ftype: str) -> dict[str, str]:
    """Per-weight types for a 'mostly `ftype`' file, as llama.cpp's llama-quantize chooses them.

    Every linear gets `ftype`; the output matrix (lm_head, or the tied embedding that serves as it)
    gets Q8_0 for block types (llama-quantize picks Q6_K, or Q8_0 when the row is not a multiple of
    256 as in SmolLM2's 576; the gguf package cannot quantize Q6_K, so Q8_0 stands in); an untied
    embedding gets `ftype`. Float ftypes (F16/BF16/F32) apply to every 2-D weight.
    """
    ftype = check_qtype(ftype)
    out_type = ftype if ftype in ("F32", "F16", "BF16", "Q8_0") else "Q8_0"
    emb = model.get_input_embeddings().weight
    types = {}
    for name, p in model.named_parameters():
        if p.ndim < 2:
            continue
        is_out = name.startswith("lm_head.") or (p is emb and _tied(model))
        types[name] = out_type if is_out else ftype
    return types


@torch.no_grad()
def simulate_gguf_(model: torch.nn.Module, qtypes: Mapping[str, str] | None = None,
                   default_qtype: str = "F16") -> list[GgufTensor]:
    """Replace, in place, every weight by what the GGUF file written with the same arguments stores
    (gguf.quants dequantize∘quantize; F32 tensors untouched). Returns the plan."""
    plan = gguf_plan(model, qtypes, default_qtype)
    params = dict(model.named_parameters())
    for entry in plan:
        if entry.qtype != "F32" and entry.hf_name in params:
            p = params[entry.hf_name]
            p.copy_(gguf_fake_quant(p, entry.qtype, entry.hf_name))
    return plan


def to_llama_cpp_layout(w: torch.Tensor, entry: GgufTensor) -> torch.Tensor:
    """Rows of q/k reordered as llama.cpp's converter does (rope pairs interleaved -> halves).

    [heads*dim, in] -> [heads, 2, dim/2, in] -swap-> [heads, dim/2, 2, in] -> [heads*dim, in].
    A row permutation commutes with row-wise block quantization, so the file's dequantized q/k
    equal the simulated ones once transformers' loader undoes the permutation.
    """
    if entry.rope_heads is None:
        return w
    n = entry.rope_heads
    return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def from_llama_cpp_layout(w: torch.Tensor, entry: GgufTensor) -> torch.Tensor:
    """The inverse of to_llama_cpp_layout: q/k rows of a GGUF file back in Hugging Face's order."""
    if entry.rope_heads is None:
        return w
    n = entry.rope_heads
    return w.reshape(n, w.shape[0] // n // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
