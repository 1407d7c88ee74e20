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

import torch
import torch.nn.functional as F

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


@torch.no_grad()
def evaluate_lm(model: torch.nn.Module, windows: Windows, batch_size: int, device: torch.device,
                reference: list[tuple[torch.Tensor, torch.Tensor]] | None = None, keep_reference: bool = False,
                n_words: int | None = None) -> tuple[LMEval, list[tuple[torch.Tensor, torch.Tensor]] | None]:
    """Return metrics and (if keep_reference) this model's scored log-probs as a new reference."""
    nll_sum, n_tok, kl_sum, agree = 0.0, 0, 0.0, 0
    new_ref: list[tuple[torch.Tensor, torch.Tensor]] = []  # per batch: (log-probs fp16 [N, V], top-1 [N])
    t0 = time.perf_counter()
    ids_all = windows.input_ids
    for bi, i in enumerate(range(0, len(ids_all), batch_size)):
        ids = ids_all[i: i + batch_size].to(device)
        starts = windows.score_from[i: i + batch_size]
        logits = model(input_ids=ids).logits[:, :-1]  # [B, T-1, V] predicts ids[:, 1:]
        mask = torch.arange(logits.shape[1], device=device)[None, :] >= starts.to(device)[:, None]  # [B, T-1]
        lp = F.log_softmax(logits[mask].float(), dim=-1)  # [N, V] scored positions only
        tgt = ids[:, 1:][mask]
        nll_sum += -lp.gather(1, tgt[:, None]).sum().item()
        n_tok += tgt.numel()
        if reference is not None:
            ref_lp, ref_top = reference[bi]
            ref = ref_lp.to(device).float()  # [N, V]
            kl_sum += F.kl_div(lp, ref, reduction="sum", log_target=True).item()  # sum P_fp (log P_fp - log P_q)
            agree += (ref_top.to(device) == lp.argmax(-1)).sum().item()
        if keep_reference:
            new_ref.append((lp.half().cpu(), lp.argmax(-1).cpu()))
    secs = time.perf_counter() - t0
    nll = nll_sum / max(n_tok, 1)
    res = LMEval(ppl=math.exp(nll), nll=nll, n_tokens=n_tok,
                 kl=kl_sum / n_tok if reference is not None else None,
                 top1=agree / n_tok if reference is not None else None,
                 seconds=secs, tok_per_s=ids_all.numel() / secs,
                 word_ppl=math.exp(nll_sum / n_words) if n_words else None, n_words=n_words)
    return res, (new_ref if keep_reference else None)
