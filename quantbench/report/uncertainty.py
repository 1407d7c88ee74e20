"""What this run's sample size can and cannot show: the recommendation's uncertainty notes.

For the recipes the decision turns on (the chosen one and every recipe whose point estimates
meet the tolerance) the notes give the paired 95% interval of their perplexity change vs FP,
say when a recipe and FP, or two recipes, cannot be told apart (the paired interval of their
difference contains 0), and how many units would resolve the observed difference:
n_needed ~ n * (Z_POWER * se / |gap|)^2 (quantbench.eval.intervals.n_to_resolve). For each task they say
which accuracy changes the documents can resolve at all, and how many documents the retention
rule would need. Pairwise comparisons need the per-unit lists (rows.jsonl); a table read from
results.csv alone gets the vs-FP intervals only.
"""
from __future__ import annotations

import math

import pandas as pd

from ..eval import intervals as stats
from .tables import as_list
from .tables import num as _num


def _se(lo: float, hi: float) -> float:
    return (hi - lo) / (2 * 1.96)


def _verdict(lo: float, hi: float, n: int, se: float, gap: float, unit: str, other: str = "") -> str:
    """'higher' / 'lower' when the paired interval excludes 0, else why the two cannot be told apart."""
    if lo <= 0 <= hi:
        head = "cannot be told apart" + (f" from {other}" if other else "")
        if gap == 0:
            return head + (" (identical on every unit)" if se == 0 else f" (no difference in {n} {unit})")
        need = stats.n_to_resolve(n, se, gap)
        return f"{head} at {n} {unit} (~{need} would resolve a difference of this size)"
    return "higher" if lo > 0 else "lower"


def _ppl_vs_fp(row: pd.Series, unit: str) -> str | None:
    d, lo, hi, n = (_num(row.get(c)) for c in ("delta_ppl_pct", "delta_ppl_lo", "delta_ppl_hi", "ci_units"))
    if d is None or lo is None or hi is None or not n:
        return None
    v = _verdict(lo, hi, int(n), _se(lo, hi), d, unit, "FP")
    v = {"higher": "measurably worse than FP", "lower": "measurably better than FP"}.get(v, v)
    return f"{row['recipe']} vs fp: perplexity {d:+.2f}% [{lo:+.2f}, {hi:+.2f}]: {v}"


def _ppl_pair(a: pd.Series, b: pd.Series, unit: str) -> str | None:
    tok, na, nb = as_list(a.get("unit_tokens")), as_list(a.get("unit_nll")), as_list(b.get("unit_nll"))
    if not (tok and na and nb) or tok != as_list(b.get("unit_tokens")):
        return None
    iv = stats.ppl_change(na, nb, tok)
    v = _verdict(iv.lo, iv.hi, iv.n, iv.se, iv.estimate, unit)
    v = {"higher": f"{a['recipe']} is measurably worse", "lower": f"{a['recipe']} is measurably better"}.get(v, v)
    return (f"{a['recipe']} vs {b['recipe']}: perplexity ratio {iv.estimate:+.2f}% [{iv.lo:+.2f}, {iv.hi:+.2f}]: {v}")


def _task_pair(a: pd.Series, b: pd.Series, task: str, metric: str) -> str | None:
    ca, cb = as_list(a.get(f"doc_{metric}:{task}")), as_list(b.get(f"doc_{metric}:{task}"))
    if not (ca and cb) or len(ca) != len(cb):
        return None
    iv = stats.accuracy_delta(ca, cb)
    v = _verdict(iv.lo, iv.hi, iv.n, iv.se, iv.estimate, "documents")
    return f"{a['recipe']} vs {b['recipe']} on {task}: {metric} {iv.estimate:+.3f} [{iv.lo:+.3f}, {iv.hi:+.3f}]: {v}"


def _task_reach(row: pd.Series, fp: pd.Series, task: str, metric: str, retention: float | None) -> str | None:
    """What the task's documents can show, from one recipe's paired interval vs FP."""
    lo, hi, n = (_num(row.get(c)) for c in (f"acc_delta_lo:{task}", f"acc_delta_hi:{task}", f"n:{task}"))
    ref = _num(fp.get(f"{metric}:{task}"))
    if lo is None or hi is None or not n or ref is None:
        return None
    half = (hi - lo) / 2
    text = (f"{task}: {int(n)} documents resolve only {metric} changes larger than about +/-{half:.2f} (FP {ref:.2f}; "
            f"{row['recipe']} vs fp {lo:+.3f}..{hi:+.3f}): they can show a collapse, not a small loss")
    if retention is not None and retention < 100:
        allowed = (1 - retention / 100) * ref
        need = stats.n_to_resolve(int(n), _se(lo, hi), allowed)
        text += (f"; they suffice to show {retention:g}% retention (a loss <= {allowed:.3f}) when few answers change"
                 if need is not None and need <= n else
                 f"; showing {retention:g}% retention (a loss <= {allowed:.3f}) needs ~{need} documents even for a "
                 f"recipe with no net change and this spread")
    return text


def _contenders(ok: pd.DataFrame, fp: pd.Series, chosen: str | None, max_ppl: float) -> list[pd.Series]:
    """The chosen recipe first, then every other non-FP recipe whose point Δppl meets the tolerance."""
    rows = [r for _, r in ok.iterrows() if r["recipe"] != fp["recipe"]]
    pick = [r for r in rows if r["recipe"] == chosen]
    pick += [r for r in rows if r["recipe"] != chosen and (_num(r.get("delta_ppl_pct")) or math.inf) <= max_ppl]
    return pick


def uncertainty_notes(ok: pd.DataFrame, fp: pd.Series | None, chosen: str | None, tol, tasks: list[str]) -> list[str]:
    """Lines for the recommendation's 'uncertainty' section (empty without an FP row)."""
    lo_col = pd.to_numeric(ok["delta_ppl_lo"], errors="coerce") if "delta_ppl_lo" in ok.columns else None
    if fp is None or lo_col is None or lo_col.isna().all():
        return ["no paired intervals in this table (no per-unit data): the decision used point estimates"]
    n, block = _num(fp.get("ci_units")), _num(fp.get("ci_block"))
    unit = f"blocks of {int(block)} tokens" if block else "blocks"
    docs = sorted({int(v) for t in tasks if (v := _num(fp.get(f"n:{t}")))})
    head = (f"paired 95% intervals over {int(n or 0)} {unit}" + (f" and {'/'.join(map(str, docs))} documents per task"
                                                                  if docs else ""))
    if n is not None and n < 10:
        head += f" (only {int(n)} units: the bootstrap intervals are rough; use more eval windows)"
    lines = [head]
    cands = _contenders(ok, fp, chosen, tol.max_ppl_increase_pct)
    lines += [x for r in cands if (x := _ppl_vs_fp(r, unit))]
    if cands and chosen and chosen != fp["recipe"]:
        lines += [x for r in cands[1:] if (x := _ppl_pair(r, cands[0], unit))]
        lines += [x for r in cands[1:] for t in tasks if (x := _task_pair(r, cands[0], t, tol.task_metric))]
    first = cands[0] if cands else next((r for _, r in ok.iterrows() if r["recipe"] != fp["recipe"]), None)
    if first is not None:
        lines += [x for t in tasks if (x := _task_pair(first, fp, t, tol.task_metric))]
        lines += [x for t in tasks if (x := _task_reach(first, fp, t, tol.task_metric, tol.min_task_retention_pct))]
    if "unit_nll" not in ok.columns:
        lines.append("(pairwise comparisons between recipes need rows.jsonl's per-unit data)")
    return lines
