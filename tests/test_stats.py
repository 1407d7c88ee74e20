"""Paired intervals against textbook formulas written here, and their coverage on simulated data."""
from __future__ import annotations

import math

import numpy as np
import pytest

from quantbench.eval import intervals as stats


def _units(rng, n: int, shift: float, noise: float = 0.05):
    """Blocks of 128 tokens: FP NLL sums vary by block (document difficulty); the variant adds
    `shift` nats/token on average plus per-block noise. True Δppl% = 100·(exp(shift) − 1)."""
    tokens = np.full(n, 128.0)
    nll_fp = tokens * rng.uniform(2.5, 3.8, n)
    nll_q = nll_fp + tokens * (shift + noise * rng.standard_normal(n))
    return nll_q, nll_fp, tokens


def test_ppl_interval_agrees_with_the_delta_method_on_many_units():
    rng = np.random.default_rng(1)
    q, f, t = _units(rng, 400, 0.03)
    iv = stats.ppl_change(q, f, t)
    # ratio estimator R = Σ(q − f)/Σt, linearised variance Σ(x_i − R t_i)² / (Σt)², Δ = 100(e^R − 1)
    x = q - f
    r = x.sum() / t.sum()
    se = 100 * math.exp(r) * math.sqrt(((x - r * t) ** 2).sum()) / t.sum()
    est = 100 * math.expm1(r)
    assert iv.estimate == pytest.approx(est, rel=1e-12)
    assert iv.se == pytest.approx(se, rel=0.1)
    assert iv.lo == pytest.approx(est - 1.96 * se, abs=0.15 * se)
    assert iv.hi == pytest.approx(est + 1.96 * se, abs=0.15 * se)


def test_pairing_removes_the_shared_variation():
    """A variant that adds exactly c nats to every token has Δppl = e^c − 1 on every resample: zero width,
    although the blocks' own perplexities vary widely (an unpaired interval would be wide)."""
    rng = np.random.default_rng(2)
    _, f, t = _units(rng, 32, 0.0)
    iv = stats.ppl_change(f + 0.02 * t, f, t)
    assert iv.lo == pytest.approx(100 * math.expm1(0.02), rel=1e-9)
    assert iv.hi == pytest.approx(100 * math.expm1(0.02), rel=1e-9)


def test_ppl_and_kl_intervals_cover_the_truth_about_95pct_of_the_time():
    rng = np.random.default_rng(3)
    truth, hits_ppl, hits_kl, reps = 100 * math.expm1(0.02), 0, 0, 200
    for i in range(reps):
        q, f, t = _units(rng, 32, 0.02)
        hits_ppl += stats.ppl_change(q, f, t, seed=i).contains(truth)
        kl = t * rng.gamma(4.0, 0.01 / 4.0, 32)  # per-block KL sums, true mean 0.01 nats/token
        hits_kl += stats.ratio_of_sums(kl, t, seed=i).contains(0.01)
    assert hits_ppl / reps > 0.88 and hits_kl / reps > 0.88


def _paired_docs(rng, n: int, cells: tuple[float, float, float, float]):
    """Documents with paired outcomes: cells = P(both right, only ref right, only variant right, both wrong)."""
    k = rng.choice(4, size=n, p=cells)
    variant = np.isin(k, (0, 2)).astype(int)
    ref = np.isin(k, (0, 1)).astype(int)
    return variant, ref


def test_accuracy_interval_agrees_with_the_paired_wald_interval_on_many_documents():
    rng = np.random.default_rng(4)
    v, r = _paired_docs(rng, 4000, (0.40, 0.10, 0.05, 0.45))
    iv = stats.accuracy_delta(v, r)
    n, b, c = len(v), int(((v == 0) & (r == 1)).sum()), int(((v == 1) & (r == 0)).sum())
    d = (c - b) / n
    se = math.sqrt((b + c) / n - d ** 2) / math.sqrt(n)  # standard paired-proportion (McNemar) variance
    assert iv.estimate == pytest.approx(d)
    assert iv.lo == pytest.approx(d - 1.96 * se, abs=0.1 * se)
    assert iv.hi == pytest.approx(d + 1.96 * se, abs=0.1 * se)


def test_accuracy_interval_depends_only_on_the_documents_that_changed():
    a = stats.accuracy_delta([1] * 20 + [0] * 10, [1] * 18 + [0, 0] + [0] * 8 + [1, 1])
    b = stats.accuracy_delta([1] * 5 + [0] * 25, [1] * 3 + [0, 0] + [0] * 23 + [1, 1])  # same b, c; other a/d split
    assert (a.lo, a.hi) == pytest.approx((b.lo, b.hi), abs=0.02)


def test_no_changed_document_out_of_30_is_not_certainty():
    """0 changes in 30 documents bounds the change rate only by ~3/30 (rule of three): the interval
    contains 0, is not a point, and stays inside ±0.1."""
    docs = [1] * 15 + [0] * 15
    iv = stats.accuracy_delta(docs, docs)
    assert iv.estimate == 0 and iv.lo < -0.01 and iv.hi > 0.01
    assert -0.1 <= iv.lo and iv.hi <= 0.1


def test_accuracy_interval_covers_the_truth_on_30_documents():
    rng = np.random.default_rng(5)
    cells, hits, reps = (0.35, 0.12, 0.05, 0.48), 0, 300
    for i in range(reps):
        v, r = _paired_docs(rng, 30, cells)
        hits += stats.accuracy_delta(v, r, seed=i).contains(cells[2] - cells[1])
    assert hits / reps > 0.9


def test_n_to_resolve_gives_about_80pct_power_at_the_observed_difference():
    """At n_needed units a true difference equal to the gap is resolved (interval excludes 0) ~80% of the time."""
    rng = np.random.default_rng(6)
    q, f, t = _units(rng, 16, 0.004, noise=0.02)
    iv = stats.ppl_change(q, f, t)
    need = stats.n_to_resolve(16, iv.se, 100 * math.expm1(0.004))
    assert need == math.ceil(16 * (2.8 * iv.se / (100 * math.expm1(0.004))) ** 2)
    assert 16 < need < 2000
    resolved = 0
    for i in range(150):
        q2, f2, t2 = _units(rng, need, 0.004, noise=0.02)
        resolved += stats.ppl_change(q2, f2, t2, resamples=400, seed=i).lo > 0
    assert 0.6 < resolved / 150 < 0.97


def test_interval_holds_its_estimate_where_the_posterior_cannot_reach_it():
    """All 30 documents flip: Δacc = −1 exactly, but θ_c − θ_b > −1 on every Dirichlet draw, so the raw
    2.5% quantile is above the estimate; the reported interval is widened to hold it (stats module doc)."""
    iv = stats.accuracy_delta([0] * 30, [1] * 30)
    theta = np.random.default_rng(stats.SEED).dirichlet([0.5, 30.5, 0.5, 0.5], size=stats.RESAMPLES)  # a, b, c, d
    raw_lo, raw_hi = np.quantile(theta[:, 2] - theta[:, 1], [0.025, 0.975])
    assert iv.estimate == -1.0 and raw_lo > -1.0
    assert iv.lo == -1.0 and iv.hi == pytest.approx(raw_hi, abs=1e-12)
    assert iv.contains(iv.estimate)
