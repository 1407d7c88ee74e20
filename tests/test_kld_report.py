"""llama.cpp's KLD report (quantbench/eval/kld.py) against computations written out here.

The reference is llama.cpp's tools/perplexity/perplexity.cpp (`--kl-divergence`): per token
KLD = Σ p_base (log p_base − log p_q), Δp = p_q(correct) − p_base(correct), "same top p" = share of
tokens with argmax_q == argmax_base; over all tokens, sorted: median = mean of the two middle values
(even N), percentile(f) = linear interpolation at f·(N − 1) (`_llama_percentile` transcribes that
lambda), RMS Δp = sqrt(mean Δp²). The tiny-model runs use torch.quantile(interpolation="linear") on
float64 per-token values computed from the two models' logits, the same interpolation.
"""
from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import tiny_model

from quantbench.data.corpus import Windows
from quantbench.eval.kld import KLD_COLUMNS, kld_columns
from quantbench.eval.lm import evaluate_lm
from quantbench.eval.suite import EvalSuite

CPU = torch.device("cpu")


def _llama_percentile(values: list[float], fraction: float) -> float:
    """llama.cpp's `percentile` lambda (perplexity.cpp), on sorted values."""
    v = sorted(values)
    if fraction <= 0:
        return v[0]
    if fraction >= 1:
        return v[-1]
    p = fraction * (len(v) - 1)
    ip = int(p)
    p -= ip
    return (1 - p) * v[ip] + p * v[min(ip + 1, len(v) - 1)]


def _llama_median(values: list[float]) -> float:
    v, n = sorted(values), len(values)
    return 0.5 * (v[n // 2] + v[n // 2 - 1]) if n % 2 == 0 else v[n // 2]


def test_columns_of_hand_made_values_are_llama_cpps_statistics():
    kl = [float(i) for i in range(10)]  # 0..9, shuffled below
    dp = [0.3, -0.4, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    order = [3, 7, 0, 9, 1, 5, 2, 8, 6, 4]
    cols = kld_columns(np.array([kl[i] for i in order]), np.array(dp))
    # by hand: median of 0..9 = 4.5; 99%: 0.99 * 9 = 8.91 -> 8 + 0.91 * (9 - 8); 99.9%: 8.991; RMS = sqrt(0.25 / 10)
    assert cols == pytest.approx({"kld_median": 4.5, "kld_p99": 8.91, "kld_p999": 8.991, "kld_max": 9.0,
                                  "dp_rms": math.sqrt(0.025)}, rel=1e-12)
    rng = np.random.default_rng(0)
    for n in (101, 1000, 4087):  # odd and even N, lognormal like real per-token KL
        k = rng.lognormal(-6, 2, n)
        got = kld_columns(k, np.zeros(n))
        want = {"kld_median": _llama_median(list(k)), "kld_p99": _llama_percentile(list(k), 0.99),
                "kld_p999": _llama_percentile(list(k), 0.999), "kld_max": max(k), "dp_rms": 0.0}
        assert got == pytest.approx(want, rel=1e-12, abs=0)
    assert kld_columns(np.zeros(0), np.zeros(0)) == {}


class TableLM(torch.nn.Module):
    """Next-token logits depend only on the current token: logits = table[id]."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table  # [V, V]

    def forward(self, input_ids):
        return SimpleNamespace(logits=self.table[input_ids])


def _per_token(lf: torch.Tensor, lq: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """float64 per-token KL(P_fp || P_q), Δp of the target, argmax agreement; lf, lq [N, V], targets [N]."""
    lp, lo = lf.double().log_softmax(-1), lq.double().log_softmax(-1)
    kl = (lp.exp() * (lp - lo)).sum(-1)
    dp = lo.exp().gather(1, targets[:, None])[:, 0] - lp.exp().gather(1, targets[:, None])[:, 0]
    return {"kl": kl, "dp": dp, "same": (lf.argmax(-1) == lq.argmax(-1)).double()}


def _direct(t: dict[str, torch.Tensor]) -> dict[str, float]:
    q = torch.quantile(t["kl"], torch.tensor([0.5, 0.99, 0.999], dtype=torch.float64), interpolation="linear")
    return {"kld_median": q[0].item(), "kld_p99": q[1].item(), "kld_p999": q[2].item(),
            "kld_max": t["kl"].max().item(), "dp_rms": t["dp"].pow(2).mean().sqrt().item()}


def test_hand_made_logits_through_the_evaluation_pass():
    """Two-token vocabulary: P = (1/2, 1/2) after token 0, Q = (1/4, 3/4): KL = ½·ln(4/3) exactly."""
    lf = torch.tensor([[0.0, 0.0], [2.0, -1.0]])
    lq = torch.tensor([[0.0, math.log(3.0)], [2.0, -1.0]])  # context 1: unchanged
    ids = torch.tensor([[0, 1, 0, 0, 1, 1, 0, 1, 0, 0, 1, 0]])
    w = Windows(ids, torch.tensor([0]), {})
    _, ref = evaluate_lm(TableLM(lf), w, batch_size=1, device=CPU, keep_reference=True)
    res, _ = evaluate_lm(TableLM(lq), w, batch_size=1, device=CPU, reference=ref)
    kl, dp = res.tokens.arrays()
    ctx, tgt = ids[0, :-1], ids[0, 1:]
    want_kl = np.where(ctx.numpy() == 0, 0.5 * math.log(4 / 3), 0.0)
    want_dp = np.where(ctx.numpy() == 0, np.where(tgt.numpy() == 1, 0.75 - 0.5, 0.25 - 0.5), 0.0)
    np.testing.assert_allclose(kl, want_kl, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(dp, want_dp, rtol=1e-6, atol=1e-7)
    ref.close()


def test_tiny_model_percentiles_equal_a_direct_float64_computation():
    fp = tiny_model("llama")
    with torch.no_grad():
        fp.lm_head.weight.mul_(30)  # peaked next-token distributions, as a trained model's
    q = copy.deepcopy(fp)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in q.parameters():
            p.add_(0.05 * p.abs().mean() * torch.randn(p.shape, generator=g))
    ids = torch.randint(0, 128, (4, 64), generator=torch.Generator().manual_seed(2))
    w = Windows(ids, torch.tensor([0, 3, 0, 9]), {})
    suite = EvalSuite(w, batch_size=3, device=CPU, tokenizer=None, probe_windows=0, ci_block=16)
    fp_res, fp_row = suite.reference(fp)
    res, row = suite.score(q)
    suite.close()
    with torch.no_grad():
        lf, lq = fp(input_ids=ids).logits, q(input_ids=ids).logits  # [B, T, V]
    scored = [(b, s) for b, s in enumerate(w.score_from.tolist())]
    per = _per_token(torch.cat([lf[b, s:-1] for b, s in scored]), torch.cat([lq[b, s:-1] for b, s in scored]),
                     torch.cat([ids[b, s + 1:] for b, s in scored]))
    want = _direct(per)
    assert want["kld_p999"] > want["kld_p99"] > want["kld_median"] > 1e-3  # a perturbation with a spread
    # ours: per-token KL in fp32 (kl_rows), Δp from fp32 NLLs; here float64. Observed relative error:
    # percentiles and max < 7e-8, dp_rms 1.6e-6
    assert {c: row[c] for c in KLD_COLUMNS} == pytest.approx(want, rel=1e-5)
    assert res.top1 == pytest.approx(per["same"].mean().item(), abs=1e-12)  # llama.cpp's "same top p" is top1
    assert {c: fp_row[c] for c in KLD_COLUMNS} == {c: 0.0 for c in KLD_COLUMNS}
    assert res.kl == pytest.approx(per["kl"].mean().item(), rel=1e-5)  # mean KLD stays the `kl` column


def test_tables_and_report_show_the_kld_columns(tmp_path):
    from quantbench.report.html import build_html
    from quantbench.report.tables import to_frame, write_tables

    base = {"status": "ok", "bits_per_weight": 16.0, "ppl": 10.0, "kl": 0.0, "top1": 1.0}
    cols = {"kld_median": 0.001, "kld_p99": 0.05, "kld_p999": 0.3, "kld_max": 2.0, "dp_rms": 0.02}
    rows = [{**base, "recipe": "fp", "mode": "fp", **{c: 0.0 for c in cols}},
            {**base, "recipe": "w4", "mode": "simulated", "kl": 0.01, "top1": 0.9, **cols}]
    df = to_frame(rows)
    write_tables(df, tmp_path)
    csv = pd.read_csv(tmp_path / "results.csv")
    assert csv.set_index("recipe").loc["w4", list(cols)].to_dict() == cols
    md = (tmp_path / "results.md").read_text().splitlines()[0]
    assert "kld_p99" in md and "kld_p999" not in md  # the main table stays short
    page = build_html(df, tmp_path)
    assert "KL divergence statistics" in page and "same_top_p" in page and "kld_p999" in page
    old = to_frame([{k: v for k, v in r.items() if k not in cols} for r in rows])  # rows from before the columns
    assert "KL divergence statistics" not in build_html(old, tmp_path)
