"""Pick one option per linear: a multiple-choice knapsack solved exactly by dynamic programming.

    minimise  sum_l score(l, o_l)   subject to  sum_l cost(l, o_l) <= capacity

Costs are integers: bits above each linear's cheapest option, rounded UP to a quantum (so the chosen
plan never exceeds the budget), or 1 per linear moved off its base option (a count limit). By default
the items are vLLM's fused sets (a layer's q/k/v, its gate/up: one option for the set, so the plan
loads in vLLM); `fused=False` lets each linear choose alone.
The dual (fewest bits whose estimated damage stays under a limit) reads the same table.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..core.errors import ConfigError
from ..quant.plan import fused_sets
from .sensitivity import Sensitivity

RESOLUTION = 20000  # DP cost units across the whole slack


def mckp(costs: list[list[int]], values: list[list[float]], capacity: int) -> tuple[list[int], np.ndarray]:
    """Exact multiple-choice knapsack: one option per item, total integer cost <= capacity, minimum
    total value. Returns (chosen option per item, best[c] = least value at total cost exactly c)."""
    if capacity < 0:
        raise ValueError("capacity must be >= 0")
    best = np.full(capacity + 1, np.inf)
    best[0] = 0.0
    back = np.zeros((len(costs), capacity + 1), dtype=np.int16)
    for i, (cs, vs) in enumerate(zip(costs, values)):
        new = np.full(capacity + 1, np.inf)
        for k, (c, v) in enumerate(zip(cs, vs)):
            if c > capacity:
                continue
            cand = np.full(capacity + 1, np.inf)
            cand[c:] = best[: capacity + 1 - c] + v
            better = cand < new
            new[better], back[i, better] = cand[better], k
        best = new
    c = int(np.argmin(best))
    if not np.isfinite(best[c]):
        raise ValueError("no option fits the capacity")
    chosen = [0] * len(costs)
    for i in range(len(costs) - 1, -1, -1):
        chosen[i] = int(back[i, c])
        c -= costs[i][chosen[i]]
    return chosen, best


@dataclass
class Choice:
    """The search's answer: option index per linear, and what it is estimated and measured to cost."""

    sens: Sensitivity
    picks: dict[str, int]
    constraint: str  # e.g. 'budget 5.0 bits/weight'

    @property
    def total_bits(self) -> float:
        return self.sens.rest_bits + sum(self.sens.bits[n][k] for n, k in self.picks.items())

    @property
    def bits_per_weight(self) -> float:
        return self.total_bits / self.sens.n_params

    @property
    def est_damage(self) -> float:
        return sum(self.sens.score[n][k] for n, k in self.picks.items())

    def kept(self) -> dict[str, int]:
        """Linears moved off the base option."""
        return {n: k for n, k in self.picks.items() if k != 0}


def _hi(v: list[float]) -> float:
    """The most bits among a linear's available options (unavailable ones are inf)."""
    return max(b for b in v if math.isfinite(b))


def _groups(s: Sensitivity, fused: bool) -> list[list[str]]:
    """The knapsack's items: vLLM's fused sets (q/k/v, gate/up share one option) or one linear each."""
    return fused_sets(s.linears) if fused else [[n] for n in s.linears]


def _solve(s: Sensitivity, groups: list[list[str]], costs: dict[str, list[int]], capacity: int):
    """mckp over groups (a group's cost and score are its members' sums); -> (picks per linear, best)."""
    k = len(s.options)
    gc = [[sum(costs[n][o] for n in g) for o in range(k)] for g in groups]
    gv = [[sum(s.score[n][o] for n in g) for o in range(k)] for g in groups]
    chosen, best = mckp(gc, gv, capacity)
    return {n: o for g, o in zip(groups, chosen) for n in g}, best


def _bit_costs(s: Sensitivity, slack_bits: float) -> dict[str, list[int]]:
    quantum = max(slack_bits, 1.0) / RESOLUTION
    never = RESOLUTION + 1  # an unavailable option costs more than any capacity
    return {n: [math.ceil((b - min(s.bits[n])) / quantum - 1e-9) if math.isfinite(b) else never for b in s.bits[n]]
            for n in s.linears}


def _in_order(s: Sensitivity, picks: dict[str, int]) -> dict[str, int]:
    return {n: picks[n] for n in s.linears}


def _floor_bits(s: Sensitivity, groups: list[list[str]]) -> float:
    """Bits of the smallest plan: each group at its cheapest option that all members can take."""
    return s.rest_bits + sum(min(sum(s.bits[n][o] for n in g) for o in range(len(s.options))) for g in groups)


def _fused_txt(fused: bool) -> str:
    return "" if fused else ", q/k/v and gate/up free to differ (not loadable in vLLM)"


def by_budget(s: Sensitivity, budget: float, fused: bool = True) -> Choice:
    """Least estimated damage with measured bits/weight <= budget."""
    groups = _groups(s, fused)
    floor_bits = _floor_bits(s, groups)
    top_bits = s.rest_bits + sum(_hi(v) for v in s.bits.values())
    if budget * s.n_params < floor_bits:
        raise ConfigError(f"mixed: budget {budget:g} bits/weight is below the smallest plan of base '{s.base}' "
                          f"({floor_bits / s.n_params:.3f} bits/weight)")
    least = s.rest_bits + sum(min(v) for v in s.bits.values())
    slack = min(budget * s.n_params, top_bits) - least
    picks, _ = _solve(s, groups, _bit_costs(s, slack), RESOLUTION)
    return Choice(s, _in_order(s, picks), f"budget {budget:g} bits/weight{_fused_txt(fused)}")


def by_damage(s: Sensitivity, max_ppl_increase_pct: float, scale: float = 1.0, fused: bool = True) -> Choice:
    """Fewest bits whose estimated perplexity increase, exp(scale * sum of scores) - 1, is at most the limit.
    scale: measured / estimated log-perplexity ratio of the uniform base recipe (1 when unknown)."""
    limit = math.log1p(max_ppl_increase_pct / 100) / scale
    groups = _groups(s, fused)
    least = s.rest_bits + sum(min(v) for v in s.bits.values())
    slack = s.rest_bits + sum(_hi(v) for v in s.bits.values()) - least
    costs = _bit_costs(s, slack)
    _, best = _solve(s, groups, costs, RESOLUTION)
    ok = np.nonzero(np.minimum.accumulate(best) <= limit)[0]
    if not len(ok):
        raise ConfigError(f"mixed: no plan of base '{s.base}' is estimated within +{max_ppl_increase_pct:g}% "
                          "perplexity (even full precision everywhere); raise the limit")
    picks, _ = _solve(s, groups, costs, int(ok[0]))
    return Choice(s, _in_order(s, picks),
                  f"estimated perplexity increase <= {max_ppl_increase_pct:g}%{_fused_txt(fused)}")


def by_count(s: Sensitivity, max_kept: int, fused: bool = True) -> Choice:
    """Least estimated damage with at most `max_kept` linears moved off the base option."""
    costs = {n: [0 if k == 0 else 1 for k in range(len(s.options))] for n in s.linears}
    picks, _ = _solve(s, _groups(s, fused), costs, max(0, max_kept))
    return Choice(s, _in_order(s, picks), f"at most {max_kept} linears off the base format{_fused_txt(fused)}")
