"""Perplexity and fidelity to the FP model, in one pass over the evaluation windows.

Protocol (recorded in the manifest): windows come from quantbench.data.corpus.eval_windows; the
loss is the mean token-level negative log-likelihood of every scored next token; perplexity
= exp(mean NLL). Fidelity compares next-token distributions with the FP model on the same
scored positions: mean KL(P_fp || P_q) in nats and top-1 agreement.

The FP reference (`FPReference`) is the FP model's fp32 logits on every scored position, written
once to an anonymous temporary file and read back a chunk at a time, so resident memory does not
grow with the protocol (8 x 511 positions x 49152 vocab = 800 MB on disk, ~25 MB in memory).
Storing probabilities in fp16 (as before) loses the vocabulary's tail (subnormals below 6e-5,
zero below 6e-8) and read the default model's w8a16 KL 35% high. KL is computed from the two
fp32 logit rows without the cancellation of `sum p log p - sum p log q` (see `kl_rows`), which
keeps it within float32 rounding of a float64 computation even when KL is ~1e-6.

Per-unit sums for intervals (`Units`): the scored positions of each window are cut into blocks
of `block` consecutive positions (the last block of a window may be shorter; blocks never cross
windows); every block carries its NLL sum, token count, KL sum and top-1 agreements. A paired
bootstrap over these blocks (quantbench.eval.intervals) gives the intervals of the report.

Per-token values (`TokenValues`): every scored position's KL and Δp = p_q(target) − p_fp(target),
in window order, for the distribution statistics of llama.cpp's `--kl-divergence` report
(quantbench.eval.kld: median / 99th / 99.9th percentile / max KL, RMS Δp).

Word-level perplexity (as lm-eval's `word_perplexity`) = exp(total NLL / number of words), where
the words are the whitespace-separated words of the scored text (count_words); it does not
depend on the tokenizer, so it compares models with different vocabularies.
"""
from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..core.errors import QuantbenchError
from ..data.corpus import Windows
from ..modeling.surgery import no_cache

DEFAULT_BLOCK = 128  # scored tokens per bootstrap unit (eval.ci_block)
_CHUNK = 128  # positions per KL chunk: bounds the transient memory to a few [128, V] fp32 buffers
_MAX_W = 80.0  # exp(80) is finite in fp32: caps log q/p at +80 nats per token (never reached by a sane model)


@dataclass
class Units:
    """Per-unit sums (blocks of `block` scored positions within a window), in window order."""

    block: int
    nll: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    kl: list[float] | None = None
    top1: list[int] | None = None

    def add_window(self, nll: torch.Tensor, kl: torch.Tensor | None, agree: torch.Tensor | None) -> None:
        """Per-position values of one window's scored positions ([n] each) -> one entry per block."""
        if kl is not None and self.kl is None:
            self.kl, self.top1 = [], []
        for a in range(0, len(nll), self.block):
            sl = slice(a, a + self.block)
            self.nll.append(float(nll[sl].double().sum()))
            self.tokens.append(len(nll[sl]))
            if kl is not None:
                self.kl.append(float(kl[sl].double().sum()))
                self.top1.append(int(agree[sl].sum()))


@dataclass
class TokenValues:
    """Per scored position, in window order: KL(P_fp || P_q) (fp32, as kl_rows gives it) and
    Δp = p_q(target) − p_fp(target) (float64, from the two models' fp32 NLLs)."""

    kl: list[torch.Tensor] = field(default_factory=list)
    dp: list[torch.Tensor] = field(default_factory=list)

    def add_window(self, kl: torch.Tensor, nll: torch.Tensor, ref_nll: torch.Tensor) -> None:
        """kl, nll, ref_nll: [n] each, one window's scored positions (this model's and the FP model's NLL)."""
        self.kl.append(kl)
        self.dp.append(torch.exp(-nll.double()) - torch.exp(-ref_nll.double()))

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(kl, dp) over all scored positions, float64 [N] each."""
        if not self.kl:
            return np.zeros(0), np.zeros(0)
        return torch.cat(self.kl).double().numpy(), torch.cat(self.dp).numpy()


@dataclass
class LMEval:
    ppl: float
    nll: float
    n_tokens: int
    kl: float | None
    top1: float | None
    seconds: float
    tok_per_s: float
    word_ppl: float | None = None
    n_words: int | None = None
    units: Units | None = None
    tokens: TokenValues | None = None  # per-position KL and Δp (only when scored against a reference)


def count_words(tokenizer, windows: Windows) -> int:
    """Whitespace-separated words in the scored text of all windows (decoded scored targets)."""
    n = 0
    for row, start in zip(windows.input_ids, windows.score_from.tolist()):
        targets = row[1:][start:]  # the scored next tokens of this window
        n += len(re.findall(r"\S+", tokenizer.decode(targets.tolist(), skip_special_tokens=True)))
    return n


def _expm1(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = expm1(x) for float32 tensors. On CPU through numpy's SIMD expm1 (<= 2.2 ulp); torch's CPU
    expm1 is a scalar loop, 5x slower, and this is the costliest step of KL."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and x.is_contiguous() and out.is_contiguous():
        np.expm1(x.numpy(), out=out.numpy())
        return out
    return torch.expm1(x, out=out)


def kl_rows(ref_logits: torch.Tensor, shift: torch.Tensor, logits: torch.Tensor,
            work: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """KL(P_fp || P_q) per row, nats. ref_logits, logits [n, V] fp32 (ref_logits is overwritten);
    shift [n]: any per-row constant near logsumexp(ref_logits) (only keeps exp in range); work: two
    scratch buffers of at least [n, V] (reused across calls: fresh large buffers cost page faults).

    With d = l_fp - l_q, p = softmax(l_fp), m = E_p[d] and u = d - m (so E_p[u] = 0):
    KL = E_p[d] + log E_p[exp(-d)] = log(1 + E_p[expm1(-u) + u]). Every term expm1(-u) + u is >= 0,
    so the sum has no cancellation, and d is exact in fp32 where the two logits are close.
    """
    n = len(logits)
    p_buf, s_buf = work if work is not None else (torch.empty_like(logits), torch.empty_like(logits))
    p, scratch = p_buf[:n], s_buf[:n]  # [n, V] views
    torch.sub(ref_logits, shift[:, None], out=p).exp_()  # unnormalised P_fp
    s = p.sum(-1)  # [n]
    d = ref_logits.sub_(logits)  # [n, V] l_fp - l_q
    m = torch.mul(p, d, out=scratch).sum(-1).div_(s)  # [n] E_p[d]
    w = torch.sub(m[:, None], d, out=d).clamp_(max=_MAX_W)  # [n, V] w = -u = m - d
    phi = _expm1(w, scratch).sub_(w)  # [n, V] e^{-u} - 1 + u >= 0
    return torch.log1p(phi.mul_(p).sum(-1).div_(s))


class FPReference:
    """The FP model's fp32 logits on every scored position, in an anonymous temporary file.

    `directory` (default: the system temp dir, $TMPDIR) must hold n_rows x vocab x 4 bytes; the
    file is unlinked at creation, so nothing is left behind even after a crash. Only the per-row
    shift (logsumexp) and the FP top-1 token stay in memory.
    """

    def __init__(self, n_rows: int, vocab: int, directory: str | None = None):
        need = n_rows * vocab * 4
        where = directory or tempfile.gettempdir()
        free = shutil.disk_usage(where).free
        if free < need + (256 << 20):
            raise QuantbenchError(f"the FP reference needs {need / 2**30:.1f} GiB of temporary disk in {where} "
                                  f"({free / 2**30:.1f} GiB free): set TMPDIR to a larger disk "
                                  "or lower eval.max_windows")
        self.n_rows, self.vocab = n_rows, vocab
        self._file = tempfile.TemporaryFile(dir=where)
        self.shift = torch.empty(n_rows)  # [n_rows] logsumexp of the FP logits
        self.top1 = torch.empty(n_rows, dtype=torch.long)  # [n_rows] argmax of the FP logits
        self.nll = torch.empty(n_rows)  # [n_rows] NLL of the FP model on each scored target (for Δp)
        self._written = 0
        self._buf: torch.Tensor | None = None  # [_CHUNK, V] read buffer, then two KL scratch buffers
        self._work: tuple[torch.Tensor, torch.Tensor] | None = None

    def append(self, logits: torch.Tensor, lse: torch.Tensor, nll: torch.Tensor) -> None:
        """Store the next rows: logits [n, V] fp32, lse [n] their logsumexp, nll [n] the NLL of their targets."""
        n, row = len(logits), self._written
        self.shift[row: row + n] = lse.cpu()
        self.nll[row: row + n] = nll.cpu()
        self.top1[row: row + n] = logits.argmax(-1).cpu()
        self._file.write(memoryview(logits.detach().cpu().contiguous().numpy()).cast("B"))
        self._written += n

    def read(self, start: int, n: int) -> torch.Tensor:
        """Rows [start, start + n) as a [n, V] fp32 tensor (a reused buffer: valid until the next read)."""
        if self._buf is None or len(self._buf) < n:
            self._buf = torch.empty(max(n, _CHUNK), self.vocab)
        self._file.flush()
        view = memoryview(self._buf[:n].numpy()).cast("B")
        offset, got = start * self.vocab * 4, 0
        while got < len(view):
            k = os.preadv(self._file.fileno(), [view[got:]], offset + got)
            if k <= 0:
                raise RuntimeError("FP reference file is shorter than expected")
            got += k
        return self._buf[:n]

    def compare(self, start: int, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """KL(P_fp || P_q) [n] and top-1 agreement [n] for the rows starting at `start`; logits [n, V] fp32."""
        n = len(logits)
        ref = self.read(start, n).to(logits.device)
        if self._work is None or len(self._work[0]) < n or self._work[0].device != logits.device:
            self._work = (torch.empty_like(logits), torch.empty_like(logits))
        kl = kl_rows(ref, self.shift[start: start + n].to(logits.device), logits, self._work)
        return kl, self.top1[start: start + n].to(logits.device) == logits.argmax(-1)

    def close(self) -> None:
        self._file.close()
        self._buf = self._work = None


def _window_pass(logits: torch.Tensor, targets: torch.Tensor, row: int, reference: FPReference | None,
                 store: FPReference | None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """logits [n, V] (a window's scored positions), targets [n] -> per-position NLL, KL, top-1 agreement."""
    nll, kl, agree = [], [], []
    for a in range(0, len(logits), _CHUNK):
        lg = logits[a: a + _CHUNK].float()  # [c, V]
        lse = torch.logsumexp(lg, dim=-1)  # [c]
        nll.append(lse - lg.gather(1, targets[a: a + _CHUNK, None]).squeeze(1))
        if store is not None:
            store.append(lg, lse, nll[-1])
        if reference is not None:
            k, g = reference.compare(row + a, lg)
            kl.append(k)
            agree.append(g)
    cat = torch.cat
    return cat(nll).cpu(), (cat(kl).cpu() if kl else None), (cat(agree).cpu() if agree else None)


def decode_order_logits(model: torch.nn.Module, ids: torch.Tensor, chunk: int) -> torch.Tensor:
    """Logits [B, T, V] of ids [B, T] computed as an engine serves them: the KV cache is filled `chunk`
    tokens at a time (1: token by token), each chunk attending over the cache as stored (a quantized
    cache, quant/kvcache.py, stores each chunk's K/V quantized once, as it is written)."""
    from transformers.cache_utils import DynamicCache

    cache, out = DynamicCache(), []
    for a in range(0, ids.shape[1], chunk):
        out.append(model(input_ids=ids[:, a: a + chunk], past_key_values=cache, use_cache=True).logits)
    return torch.cat(out, dim=1)


def _logits(model: torch.nn.Module, ids: torch.Tensor, kv_chunk: int | None) -> torch.Tensor:
    if kv_chunk is None:
        return model(input_ids=ids, **no_cache(model)).logits
    return decode_order_logits(model, ids, kv_chunk)


@torch.no_grad()
def evaluate_lm(model: torch.nn.Module, windows: Windows, batch_size: int, device: torch.device,
                reference: FPReference | None = None, keep_reference: bool = False,
                n_words: int | None = None, block: int = DEFAULT_BLOCK,
                spill_dir: str | None = None, kv_chunk: int | None = None) -> tuple[LMEval, FPReference | None]:
    """Return metrics and (if keep_reference) this model's reference for later comparisons.
    kv_chunk: None scores each window in one forward (whole prefill); n fills the KV cache n tokens at a
    time (decode order, `decode_order_logits`).

    Works window by window on views of the logits (no copy of the batch's scored rows) and in
    chunks of _CHUNK positions, so memory stays at the model's own logits plus a few chunk buffers.
    """
    ids_all, starts = windows.input_ids, windows.score_from.tolist()
    t_len = ids_all.shape[1]
    units = Units(block)
    tokens = TokenValues() if reference is not None else None
    store: FPReference | None = None
    row, t0 = 0, time.perf_counter()
    for i in range(0, len(ids_all), batch_size):
        ids = ids_all[i: i + batch_size].to(device)
        logits = _logits(model, ids, kv_chunk)  # [B, T, V]; position j predicts ids[:, j + 1]
        if keep_reference and store is None:
            n_rows = sum(t_len - 1 - s for s in starts)
            store = FPReference(n_rows, logits.shape[-1], spill_dir)
        for b in range(ids.shape[0]):
            s = starts[i + b]
            nll, kl, agree = _window_pass(logits[b, s: t_len - 1], ids[b, s + 1:], row, reference, store)
            units.add_window(nll, kl, agree)
            if tokens is not None:
                tokens.add_window(kl, nll, reference.nll[row: row + len(nll)])
            row += len(nll)
        del logits
    secs = time.perf_counter() - t0
    nll_sum, n_tok = math.fsum(units.nll), sum(units.tokens)
    nll = nll_sum / max(n_tok, 1)
    res = LMEval(ppl=math.exp(nll), nll=nll, n_tokens=n_tok,
                 kl=math.fsum(units.kl) / n_tok if reference is not None else None,
                 top1=sum(units.top1) / n_tok if reference is not None else None,
                 seconds=secs, tok_per_s=ids_all.numel() / secs,
                 word_ppl=math.exp(nll_sum / n_words) if n_words else None, n_words=n_words, units=units,
                 tokens=tokens)
    return res, store
