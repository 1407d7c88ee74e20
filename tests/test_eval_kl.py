"""KL against float64 computations written here; its direction; per-block units; the on-disk FP reference."""
from __future__ import annotations

import copy
import math
import os
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_model

from quantbench.core.errors import QuantbenchError
from quantbench.data.corpus import Windows
from quantbench.eval.lm import evaluate_lm

CPU = torch.device("cpu")


class TableLM(torch.nn.Module):
    """A language model whose next-token logits depend only on the current token: logits = table[id]."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table  # [V, V] fp32

    def forward(self, input_ids):
        return SimpleNamespace(logits=self.table[input_ids])


def _windows(v: int, b: int = 3, t: int = 40, starts=(0, 0, 0)) -> Windows:
    ids = torch.randint(0, v, (b, t), generator=torch.Generator().manual_seed(2))
    return Windows(ids, torch.tensor(starts), {})


def _kl64(lf: torch.Tensor, lq: torch.Tensor) -> float:
    """Mean over rows of sum_v P_fp log(P_fp / P_q), all in float64 (lf, lq: [N, V] logits)."""
    lp, lqq = lf.double().log_softmax(-1), lq.double().log_softmax(-1)
    return (lp.exp() * (lp - lqq)).sum(-1).mean().item()


def _scored_logits(model, w: Windows) -> torch.Tensor:
    """[N, V] logits of the scored positions, in window order."""
    with torch.no_grad():
        out = model(input_ids=w.input_ids).logits
    return torch.cat([out[i, s: w.input_ids.shape[1] - 1] for i, s in enumerate(w.score_from.tolist())])


def test_kl_of_a_perturbed_tiny_model_is_within_2ppm_of_float64():
    """Observed relative error 6.8e-8 (worst 7.8e-8 over perturbation seeds 3-7); 1-ulp random noise on the
    fp32 logits (another CPU, another batch split) moves this KL by up to 1.4e-7: bound 2e-6."""
    fp = tiny_model("llama")
    q = copy.deepcopy(fp)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in q.parameters():
            p.add_(0.02 * p.abs().mean() * torch.randn(p.shape, generator=g))
    w = _windows(128, starts=(0, 5, 11))
    _, ref = evaluate_lm(fp, w, batch_size=2, device=CPU, keep_reference=True)
    res, _ = evaluate_lm(q, w, batch_size=2, device=CPU, reference=ref)
    want = _kl64(_scored_logits(fp, w), _scored_logits(q, w))
    assert 1e-5 < want < 0.1
    assert res.kl == pytest.approx(want, rel=2e-6)
    same, _ = evaluate_lm(fp, w, batch_size=3, device=CPU, reference=ref)
    assert same.kl == 0.0 and same.top1 == 1.0


def _tail_tables(v: int = 128, tail: float = -14.0) -> tuple[torch.Tensor, torch.Tensor]:
    """P: one dominant token per context, the other 127 near e^-14 (~1e-6, fp16 subnormals);
    Q: the same with every tail logit raised by up to log 10. KL ~2e-4 lives in the tail."""
    g = torch.Generator().manual_seed(0)
    lf = tail + 0.5 * torch.randn(v, v, generator=g)
    lf[torch.arange(v), (torch.arange(v) * 7) % v] = 0.0
    lq = lf.clone()
    tail_mask = lf < -1
    lq[tail_mask] += math.log(10) * torch.rand(int(tail_mask.sum()), generator=g)
    return lf, lq


def test_tiny_kl_living_in_the_vocabulary_tail_is_within_1ppm_where_fp16_probabilities_fail():
    """Observed relative error 3.9e-8 (worst 1.0e-7 with the tail at e^-12..e^-16): bound 1e-6."""
    lf, lq = _tail_tables()
    w = _windows(128)
    _, ref = evaluate_lm(TableLM(lf), w, batch_size=2, device=CPU, keep_reference=True)
    res, _ = evaluate_lm(TableLM(lq), w, batch_size=2, device=CPU, reference=ref)
    a, b = lf[w.input_ids[:, :-1]].reshape(-1, 128), lq[w.input_ids[:, :-1]].reshape(-1, 128)  # [N, V]
    want = _kl64(a, b)
    assert want < 1e-3
    assert res.kl == pytest.approx(want, rel=1e-6)
    # the former reference, P_fp stored as fp16: sum p log p - sum p l_q + lse_q sum p
    p16 = a.softmax(-1).half().double()
    fp16 = (torch.special.xlogy(p16, p16).sum(-1) - (p16 * b.double()).sum(-1)
            + torch.logsumexp(b.double(), -1) * p16.sum(-1)).mean().item()
    assert abs(fp16 / want - 1) > 0.05  # the case does break an fp16 reference


def test_kl_direction_is_fp_to_quantized():
    """KL(P_fp || P_q) = sum P_fp log(P_fp/P_q); on these tables the reverse differs by > 30%."""
    v = 16
    g = torch.Generator().manual_seed(5)
    lf = 3.0 * torch.randn(v, v, generator=g)  # peaked
    lq = 0.3 * torch.randn(v, v, generator=g)  # flat
    w = _windows(v, b=2, t=24)
    _, ref = evaluate_lm(TableLM(lf), w, batch_size=2, device=CPU, keep_reference=True)
    res, _ = evaluate_lm(TableLM(lq), w, batch_size=2, device=CPU, reference=ref)
    rows_f, rows_q = lf[w.input_ids[:, :-1]].reshape(-1, v).double(), lq[w.input_ids[:, :-1]].reshape(-1, v).double()
    pf, pq = rows_f.softmax(-1), rows_q.softmax(-1)
    forward = (pf * (pf.log() - pq.log())).sum(-1).mean().item()
    reverse = (pq * (pq.log() - pf.log())).sum(-1).mean().item()
    assert abs(forward - reverse) > 0.3 * reverse
    assert res.kl == pytest.approx(forward, rel=1e-6)  # observed 9.4e-8 (worst 1.3e-7 over table seeds 5-8)


def test_units_are_blocks_within_windows_and_sum_to_the_totals():
    model = tiny_model("llama")
    w = _windows(128, b=2, t=33, starts=(0, 7))  # 32 and 25 scored positions
    res, _ = evaluate_lm(model, w, batch_size=2, device=CPU, block=10)
    u = res.units
    assert u.tokens == [10, 10, 10, 2, 10, 10, 5]
    assert math.isclose(sum(u.nll) / sum(u.tokens), res.nll, rel_tol=1e-12)
    ids = w.input_ids
    for k, (win, first) in enumerate([(0, 0), (0, 10), (0, 20), (0, 30), (1, 7), (1, 17), (1, 27)]):
        labels = torch.full_like(ids[win: win + 1], -100)
        last = min(first + 10, 32)
        labels[0, first + 1: last + 1] = ids[win, first + 1: last + 1]  # targets of positions first..last-1
        with torch.no_grad():
            loss = model(input_ids=ids[win: win + 1], labels=labels).loss.item()  # mean NLL of the block
        assert u.nll[k] == pytest.approx(loss * u.tokens[k], rel=1e-5)


def test_fp_reference_lives_in_an_unlinked_file_not_in_memory():
    lf, _ = _tail_tables()
    w = _windows(128)
    _, ref = evaluate_lm(TableLM(lf), w, batch_size=2, device=CPU, keep_reference=True)
    st = os.fstat(ref._file.fileno())
    assert st.st_nlink == 0  # no name on disk: nothing is left behind, even after a crash
    assert st.st_size == 3 * 39 * 128 * 4  # every scored position's fp32 logits
    assert torch.equal(ref.read(5, 3), lf[w.input_ids[0, 5:8]])
    assert ref.shift.numel() == 3 * 39  # only per-position scalars stay in memory
    ref.close()


def test_too_little_temporary_disk_is_one_line(monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda p: SimpleNamespace(total=1 << 30, used=0, free=1 << 20))
    with pytest.raises(QuantbenchError) as e:
        evaluate_lm(TableLM(torch.zeros(8, 8)), _windows(8), batch_size=2, device=CPU, keep_reference=True)
    assert "\n" not in str(e.value) and "TMPDIR" in str(e.value)
