"""Paired 95% intervals for every number a decision rests on.

Units. Perplexity and KL: blocks of `eval.ci_block` consecutive scored tokens within a window
(quantbench.eval.lm.Units: NLL sum, token count, KL sum per block). Task accuracy: documents.
Both variants of a comparison are scored on the same units, so every interval is *paired*.

Methods.
- Perplexity change and KL: percentile paired bootstrap over units (RESAMPLES seeded resamples).
  Each resample draws units with replacement (multinomial counts w); the statistic is recomputed
  on it from sums, as the point estimate is: Δppl% = 100·(exp((w·nll_a − w·nll_b) / w·tokens) − 1),
  KL = w·kl / w·tokens. The same draws serve both variants (paired).
- Task accuracy: the paired 2x2 table of the documents (a: both right, b: only the reference
  right, c: only the variant right, d: both wrong) gets a Dirichlet(a+½, b+½, c+½, d+½)
  posterior (Jeffreys prior: the Bayesian bootstrap of the documents with half a pseudo-document
  per cell); Δacc = θ_c − θ_b, RESAMPLES seeded draws, 2.5/97.5% quantiles. Unlike the plain
  bootstrap it does not collapse to [0, 0] when no document changed its answer, which on 30
  documents is common and says little: 0 changes in n leaves a change rate up to ~3/n.
- Every interval contains its point estimate: the bounds reported are min(lo, estimate) and
  max(hi, estimate) (_interval). The accuracy interval is a posterior with half a pseudo-document
  per cell, so it cannot reach ±1, while the estimate (c − b)/n can: when all 30 documents flip,
  Δacc = −1 and the 2.5% quantile is about −0.996 (3 documents: −0.965). Left alone such an
  interval excludes its own estimate, and a tolerance judged at the bound (recommend: Δppl at its
  upper bound, Δacc at its lower bound) would be more lenient than one judged at the estimate.
  Widening only ever widens (coverage can only rise) and keeps the bound at least as strict as the
  estimate. For the perplexity/KL bootstrap of a ratio of sums it binds at most by float rounding
  (0 of 3000 simulated skewed runs of 2-11 blocks); it moved no bound of the committed reference runs.
- Sample size that would resolve a gap: with se the interval's standard error at n units and
  |gap| the difference to resolve (from 0, or from a tolerance), n_needed ≈ n·(Z_POWER·se/|gap|)²,
  Z_POWER = 1.96 + 0.84: a 95% interval then excludes the gap's other side with 80% probability
  if the true difference equals the observed one (se shrinks as 1/√n).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

LEVEL = 0.95
RESAMPLES = 2000
SEED = 0
Z_POWER = 1.96 + 0.84


@dataclass(frozen=True)
class Interval:
    """A point estimate with its paired interval; se = standard deviation of the resampled statistic."""

    estimate: float
    lo: float
    hi: float
    se: float
    n: int

    def contains(self, x: float) -> bool:
        return self.lo <= x <= self.hi


def _arrays(*xs: Sequence[float]) -> list[np.ndarray]:
    arrs = [np.asarray(x, dtype=np.float64) for x in xs]
    if len({len(a) for a in arrs}) != 1 or len(arrs[0]) == 0:
        raise ValueError(f"paired units must be non-empty and of equal length, got {[len(a) for a in arrs]}")
    return arrs


def _counts(n: int, resamples: int, seed: int) -> np.ndarray:
    """[resamples, n] multinomial counts: how often each unit is drawn in each bootstrap resample."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)


def _interval(estimate: float, draws: np.ndarray, n: int, level: float) -> Interval:
    """The draws' central `level` quantiles, widened to hold the estimate (why: the module doc)."""
    lo, hi = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2])
    return Interval(float(estimate), float(min(lo, estimate)), float(max(hi, estimate)), float(draws.std(ddof=1)), n)


def ppl_change(nll: Sequence[float], nll_ref: Sequence[float], tokens: Sequence[float], resamples: int = RESAMPLES,
               seed: int = SEED, level: float = LEVEL) -> Interval:
    """100·(ppl/ppl_ref − 1) in percent, ppl = exp(Σ nll / Σ tokens) over the same units."""
    a, b, t = _arrays(nll, nll_ref, tokens)
    est = 100 * math.expm1((a.sum() - b.sum()) / t.sum())
    w = _counts(len(a), resamples, seed)  # [R, n]
    draws = 100 * np.expm1((w @ (a - b)) / (w @ t))  # [R]
    return _interval(est, draws, len(a), level)


def ratio_of_sums(values: Sequence[float], tokens: Sequence[float], resamples: int = RESAMPLES, seed: int = SEED,
                  level: float = LEVEL) -> Interval:
    """Σ values / Σ tokens (e.g. mean KL per token) with a bootstrap interval over units."""
    v, t = _arrays(values, tokens)
    w = _counts(len(v), resamples, seed)
    return _interval(v.sum() / t.sum(), (w @ v) / (w @ t), len(v), level)


def _cells(correct: Sequence[float], correct_ref: Sequence[float]) -> np.ndarray:
    """Paired 2x2 counts [a both right, b only ref right, c only this right, d both wrong]."""
    x, r = (np.asarray(v, dtype=bool) for v in _arrays(correct, correct_ref))
    return np.array([(x & r).sum(), (~x & r).sum(), (x & ~r).sum(), (~x & ~r).sum()], dtype=np.float64)


def accuracy_draws(correct: Sequence[float], correct_ref: Sequence[float], resamples: int = RESAMPLES,
                   seed: int = SEED) -> np.ndarray:
    """[resamples] draws of Δacc = acc − acc_ref from the Jeffreys-Dirichlet posterior of the paired table."""
    theta = np.random.default_rng(seed).dirichlet(_cells(correct, correct_ref) + 0.5, size=resamples)  # [R, 4]
    return theta[:, 2] - theta[:, 1]


def accuracy_delta(correct: Sequence[float], correct_ref: Sequence[float], resamples: int = RESAMPLES,
                   seed: int = SEED, level: float = LEVEL) -> Interval:
    """Δacc = mean(correct) − mean(correct_ref) over the same documents, with its paired interval."""
    cells = _cells(correct, correct_ref)
    n = int(cells.sum())
    est = (cells[2] - cells[1]) / n
    return _interval(est, accuracy_draws(correct, correct_ref, resamples, seed), n, level)


def mean_accuracy_delta(pairs: Sequence[tuple[Sequence[float], Sequence[float]]], resamples: int = RESAMPLES,
                        seed: int = SEED, level: float = LEVEL) -> Interval:
    """Mean over tasks of Δacc (tasks independent: each task's draws averaged draw by draw)."""
    draws = np.mean([accuracy_draws(c, r, resamples, seed + i) for i, (c, r) in enumerate(pairs)], axis=0)
    ests = [(cl[2] - cl[1]) / cl.sum() for cl in (_cells(c, r) for c, r in pairs)]
    return _interval(float(np.mean(ests)), draws, sum(len(c) for c, _ in pairs), level)


def n_to_resolve(n: int, se: float, gap: float, z: float = Z_POWER) -> int | None:
    """Units needed for an interval of this spread to separate a true difference `gap` from zero
    (n·(z·se/|gap|)²); None when gap is 0 (no observed difference to resolve)."""
    if gap == 0 or not math.isfinite(gap) or not math.isfinite(se):
        return None
    return max(n, math.ceil(n * (z * se / abs(gap)) ** 2))
