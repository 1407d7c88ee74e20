"""A Hugging Face (fast) tokenizer as llama.cpp's `tokenizer.ggml.*` metadata.

Two vocabulary kinds, the ones Llama-family checkpoints use:
- byte-level BPE (GPT-2 style: Llama 3, SmolLM, Qwen2, Mistral Nemo) -> `tokenizer.ggml.model = gpt2`
  with tokens, token types and merges, and `tokenizer.ggml.pre` naming llama.cpp's pre-tokenizer;
- sentencepiece-style BPE with byte fallback (Llama 2, Mistral 7B) -> `tokenizer.ggml.model = llama`
  with tokens, scores and token types (merges too, so transformers rebuilds the exact merge order).
Written from llama.cpp's documented conventions (convert_hf_to_gguf.py: get_vocab_base,
get_vocab_base_pre); anything else (Unigram, WordPiece) is refused in one line.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from hashlib import sha256

from ..core.errors import QuantbenchError

# llama.cpp identifies a BPE pre-tokenizer by sha256(str(tokenizer.encode(CHECK_TEXT))).
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 "
    "3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
# The llama-family entries of llama.cpp's hash table (hash -> tokenizer.ggml.pre).
KNOWN_PRE = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM / SmolLM2
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5 / Qwen2
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral Nemo
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}
# gguf.TokenType values
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


@dataclass
class GgufVocab:
    model: str  # "gpt2" (byte-level BPE) | "llama" (sentencepiece-style BPE)
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    scores: list[float] | None = None
    pre: str | None = None
    special_ids: dict[str, int] = field(default_factory=dict)  # bos / eos / unk / pad
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool = False
    chat_template: str | None = None
    warnings: list[str] = field(default_factory=list)


def _backend_json(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise QuantbenchError(f"GGUF export needs a fast (tokenizers-backed) tokenizer, got {type(tokenizer).__name__}")
    return json.loads(backend.to_str())


def _kind(tj: dict) -> str:
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise QuantbenchError(f"GGUF export supports BPE tokenizers only; this one is {model.get('type')!r}")
    text = json.dumps(tj.get("pre_tokenizer")) + json.dumps(tj.get("decoder"))
    if '"ByteLevel"' in text:
        return "gpt2"
    if model.get("byte_fallback"):
        return "llama"
    raise QuantbenchError("GGUF export: BPE tokenizer is neither byte-level nor sentencepiece-style (byte fallback)")


def _merges(tj: dict) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in tj["model"].get("merges", [])]


def _looks_special(token: str) -> bool:
    """llama.cpp's does_token_look_special: added tokens some models forget to mark special."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<unused") and token.endswith(">")))


def _tokens_and_types(tokenizer, kind: str, vocab_size: int) -> tuple[list[str], list[int]]:
    vocab = tokenizer.get_vocab()
    if vocab and max(vocab.values()) >= vocab_size:
        raise QuantbenchError(f"tokenizer has id {max(vocab.values())} but the model's vocab_size is {vocab_size}")
    reverse = {i: t for t, i in vocab.items()}
    added = {i: t for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    unk = getattr(tokenizer, "unk_token_id", None)
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:  # the model's embedding is larger than the vocabulary
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
            continue
        tok = reverse[i]
        tokens.append(tok)
        if kind == "llama" and i == unk:
            types.append(UNKNOWN)
        elif kind == "llama" and _BYTE_TOKEN.fullmatch(tok):
            types.append(BYTE)
        elif i in added:
            types.append(CONTROL if added[i].special or _looks_special(tok) else USER_DEFINED)
        else:
            types.append(NORMAL)
    return tokens, types


def _pre_tokenizer(tokenizer, warnings: list[str]) -> str:
    digest = sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()
    if digest in KNOWN_PRE:
        return KNOWN_PRE[digest]
    warnings.append(f"BPE pre-tokenizer not recognised (hash {digest[:12]}...): wrote 'default'; "
                    "llama.cpp may split text differently than the original tokenizer (pass pre= to override)")
    return "default"


def _adds(tokenizer) -> tuple[bool, bool]:
    """Whether encoding adds BOS at the start / EOS at the end (observed, not read from a flag)."""
    with_sp = tokenizer.encode("a", add_special_tokens=True)
    without = tokenizer.encode("a", add_special_tokens=False)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    extra = len(with_sp) > len(without)
    return (extra and bos is not None and with_sp[0] == bos), (extra and eos is not None and with_sp[-1] == eos)


def _space_prefix(tj: dict) -> bool:
    text = json.dumps(tj.get("normalizer")) + json.dumps(tj.get("pre_tokenizer"))
    prepends = '"Prepend"' in text or ('"Metaspace"' in text and '"prepend_scheme": "never"' not in text)
    return prepends


def vocab_from_tokenizer(tokenizer, vocab_size: int, pre: str | None = None) -> GgufVocab:
    """Everything llama.cpp and transformers need to rebuild `tokenizer` from a GGUF file."""
    tj = _backend_json(tokenizer)
    kind = _kind(tj)
    tokens, types = _tokens_and_types(tokenizer, kind, vocab_size)
    warnings: list[str] = []
    out = GgufVocab(model=kind, tokens=tokens, token_types=types, merges=_merges(tj), warnings=warnings)
    if kind == "gpt2":
        out.pre = pre or _pre_tokenizer(tokenizer, warnings)
    else:
        # sentencepiece BPE merges the pair whose result scores highest; -id keeps the vocabulary's
        # order (a BPE sentencepiece model lists pieces best first). Bytes and control tokens score 0.
        out.scores = [-float(i) if t in (NORMAL, USER_DEFINED) else 0.0 for i, t in enumerate(types)]
        out.add_space_prefix = _space_prefix(tj)
    for key in ("bos", "eos", "unk", "pad"):
        tid = getattr(tokenizer, f"{key}_token_id", None)
        if tid is not None and tid < vocab_size:
            out.special_ids[key] = int(tid)
    out.add_bos, out.add_eos = _adds(tokenizer)
    template = getattr(tokenizer, "chat_template", None)
    out.chat_template = template if isinstance(template, str) else None
    return out


def add_vocab(writer, vocab: GgufVocab) -> None:
    """Write `vocab` as tokenizer.ggml.* keys on a gguf.GGUFWriter."""
    writer.add_tokenizer_model(vocab.model)
    if vocab.pre is not None:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    setters = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id,
               "unk": writer.add_unk_token_id, "pad": writer.add_pad_token_id}
    for key, tid in vocab.special_ids.items():
        setters[key](tid)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    writer.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
