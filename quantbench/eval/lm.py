"""Perplexity and fidelity to the FP model, in one pass over the evaluation windows.

Protocol (recorded in the manifest): windows come from quantbench.data.eval_windows; the
loss is the mean token-level negative log-likelihood of every scored next token; perplexity
= exp(mean NLL). Fidelity compares next-token distributions with the FP model on the same
scored positions: mean KL(P_fp || P_q) in nats and top-1 agreement. The FP log-probs are
computed once and kept (fp16, on CPU) as the reference for every recipe, with the FP top-1
token taken from the fp32 log-probs (fp16 rounding would break near-ties).

Word-level perplexity (as lm-eval's `word_perplexity`) = exp(total NLL / number of words), where
the words are the whitespace-separated words of the scored text (count_words); it does not
depend on the tokenizer, so it compares models with different vocabularies.
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..data import Windows


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


def count_words(tokenizer, windows: Windows) -> int:
    """Whitespace-separated words in the scored text of all windows (decoded scored targets)."""
    n = 0
    for row, start in zip(windows.input_ids, windows.score_from.tolist()):
        targets = row[1:][start:]  # the scored next tokens of this window
        n += len(re.findall(r"\S+", tokenizer.decode(targets.tolist(), skip_special_tokens=True)))
    return n


class RefBatch(NamedTuple):
    """The FP reference for one batch of scored positions (N of them)."""

    probs: torch.Tensor  # [N, V] fp16 P_fp
    top1: torch.Tensor  # [N] argmax of the fp32 logits
    neg_entropy: torch.Tensor  # [N] sum_v p log p of the stored fp16 probs (fp32)
    mass: torch.Tensor  # [N] sum_v p of the stored fp16 probs (~1)


def _reference(logits: torch.Tensor, lse: torch.Tensor) -> RefBatch:
    """logits [N, V] fp32, lse [N] -> what later KL/top-1 computations need."""
    p = (logits - lse[:, None]).exp_().half()  # [N, V]
    pf = p.float()
    return RefBatch(p.cpu(), logits.argmax(-1).cpu(), torch.special.xlogy(pf, pf).sum(-1).cpu(), pf.sum(-1).cpu())


@torch.no_grad()
def evaluate_lm(model: torch.nn.Module, windows: Windows, batch_size: int, device: torch.device,
                reference: list[RefBatch] | None = None, keep_reference: bool = False,
                n_words: int | None = None) -> tuple[LMEval, list[RefBatch] | None]:
    """Return metrics and (if keep_reference) this model's reference for later comparisons.

    Never materialises log-probabilities: with lse = logsumexp(logits),
    NLL = lse - logit[target] and KL(P_fp || P_q) = sum p log p - (sum p * logits - lse * sum p).
    """
    nll_sum, n_tok, kl_sum, agree = 0.0, 0, 0.0, 0
    new_ref: list[RefBatch] = []
    t0 = time.perf_counter()
    ids_all = windows.input_ids
    for bi, i in enumerate(range(0, len(ids_all), batch_size)):
        ids = ids_all[i: i + batch_size].to(device)
        starts = windows.score_from[i: i + batch_size]
        logits = model(input_ids=ids).logits[:, :-1]  # [B, T-1, V] predicts ids[:, 1:]
        mask = torch.arange(logits.shape[1], device=device)[None, :] >= starts.to(device)[:, None]  # [B, T-1]
        logits = logits[mask].float()  # [N, V] scored positions only
        tgt = ids[:, 1:][mask]
        lse = torch.logsumexp(logits, dim=-1)  # [N]
        nll_sum += (lse - logits.gather(1, tgt[:, None]).squeeze(1)).sum().item()
        n_tok += tgt.numel()
        if reference is not None:
            ref = reference[bi]
            cross = torch.bmm(ref.probs.to(device).float()[:, None, :], logits[:, :, None]).reshape(-1)  # [N] sum p*logit
            kl_sum += (ref.neg_entropy.to(device) - cross + lse * ref.mass.to(device)).sum().item()
            agree += (ref.top1.to(device) == logits.argmax(-1)).sum().item()
        if keep_reference:
            new_ref.append(_reference(logits, lse))
    secs = time.perf_counter() - t0
    nll = nll_sum / max(n_tok, 1)
    res = LMEval(ppl=math.exp(nll), nll=nll, n_tokens=n_tok,
                 kl=kl_sum / n_tok if reference is not None else None,
                 top1=agree / n_tok if reference is not None else None,
                 seconds=secs, tok_per_s=ids_all.numel() / secs,
                 word_ppl=math.exp(nll_sum / n_words) if n_words else None, n_words=n_words)
    return res, (new_ref if keep_reference else None)
