"""Pick the smallest recipe that stays within tolerance of the FP model, and say why smaller ones fail.

Rule (MLPerf's "99% of FP" spirit): a recipe passes when its perplexity increase over FP is at
most `max_ppl_increase_pct` and, if `min_task_retention_pct` is set, its accuracy on every task
is at least that share of FP's. Candidates are ordered by bits per weight (smallest first); ties
go to the lower perplexity increase, then the lower KL, then the name. A recipe with a metric
the tolerance needs but the table lacks fails ("not measured"): it cannot be vouched for. FP
always passes, so when no quantized recipe does, the answer is FP (16 bits).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd
import yaml

from .tables import task_names


@dataclass(frozen=True)
class Tolerance:
    max_ppl_increase_pct: float = 2.0
    min_task_retention_pct: float | None = None
    task_metric: str = "acc"


@dataclass
class Verdict:
    recipe: str
    bits_per_weight: float | None
    passed: bool
    reasons: list[str] = field(default_factory=list)
    causes: list[str] = field(default_factory=list)


@dataclass
class Recommendation:
    chosen: str | None
    tolerance: Tolerance
    verdicts: list[Verdict]
    snippet: str | None
    note: str = ""

    def text(self) -> str:
        return render(self)


def _num(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def _fp_row(df: pd.DataFrame) -> pd.Series | None:
    fp = df[(df.get("mode") == "fp") | (df["recipe"] == "fp")] if "mode" in df.columns else df[df["recipe"] == "fp"]
    return fp.iloc[0] if len(fp) else None


def _check(row: pd.Series, fp: pd.Series | None, tol: Tolerance, tasks: list[str]) -> list[str]:
    reasons = []
    d = _num(row.get("delta_ppl_pct"))
    if d is None:
        reasons.append("perplexity not measured")
    elif d > tol.max_ppl_increase_pct:
        reasons.append(f"perplexity +{d:.2f}% > +{tol.max_ppl_increase_pct:g}% allowed "
                       f"(over by {d - tol.max_ppl_increase_pct:.2f} points; ppl {_num(row.get('ppl')) or float('nan'):.3f})")
    if tol.min_task_retention_pct is None:
        return reasons
    if not tasks:
        return reasons + ["task accuracy not measured (no tasks in this run)"]
    for t in tasks:
        col = f"{tol.task_metric}:{t}"
        q, ref = _num(row.get(col)), _num(fp.get(col)) if fp is not None else None
        if q is None or ref is None or ref <= 0:
            reasons.append(f"{t}: accuracy not measured" + (" for FP" if q is not None else ""))
            continue
        kept = 100 * q / ref
        if kept < tol.min_task_retention_pct:
            se = _num(row.get(f"acc_se:{t}"))
            reasons.append(f"{t}: accuracy {q:.3f} = {kept:.1f}% of FP {ref:.3f} < {tol.min_task_retention_pct:g}% "
                           f"(short by {tol.min_task_retention_pct - kept:.1f} points" + (f"; stderr {se:.3f})" if se else ")"))
    return reasons


def explain_causes(recipe: dict | None, row: pd.Series, census: dict | None) -> list[str]:
    """Tie a failure to the census: which outliers the recipe's quantizer cannot represent."""
    out: list[str] = []
    s = (census or {}).get("summary") or {}
    act, w = (recipe or {}).get("activations"), (recipe or {}).get("weights")
    mx, ratio, dims = _num(s.get("max_abs")), _num(s.get("max_ratio")), s.get("outlier_dims") or []
    if act and mx and ratio:
        levels = 2 ** (int(act.get("bits", 8)) - 1) - 1
        med = mx / ratio
        if act.get("granularity") == "tensor":
            out.append(f"activation outliers set the per-tensor range: max |x| {mx:.0f} = {ratio:.0f}x the median "
                       f"in dims {dims}; the {act.get('bits')}-bit step {mx / levels:.1f} exceeds the median |x| "
                       f"{med:.2g}, so ordinary activations round to ~0")
        else:
            out.append(f"per-{act.get('granularity')} {act.get('bits')}-bit activations: the outlier tokens' range "
                       f"(max |x| {mx:.0f}, dims {dims}) still squeezes the other channels of those tokens")
    sink_fp, drift = _num(s.get("mean_first_token_attn")), _num(row.get("sink_drift"))
    if act and sink_fp is not None and drift is not None and abs(drift) > 0.01:
        out.append(f"attention sink drift: first-token attention mass {sink_fp:.2f} in FP changed by {drift:+.3f}")
    li = s.get("max_linear_input") or {}
    if act and _num(li.get("ratio")):
        out.append(f"largest linear-input outlier: {li.get('module')} of layer {li.get('layer')} "
                   f"({li['ratio']:.0f}x its median)")
    wr = s.get("max_weight_ratio") or {}
    if w and not act:
        g = w.get("group_size") or w.get("granularity")
        out.append(f"{w.get('bits')}-bit weights (block {g}): weight outliers dominate their blocks' scales"
                   + (f"; census: {wr.get('module')} of layer {wr.get('layer')} has max|W|/mean|W| "
                      f"{wr['max_over_mean']:.0f}" if _num(wr.get("max_over_mean")) else ""))
    out += _layer_causes(row, s)
    return out


def _layer_causes(row: pd.Series, s: dict) -> list[str]:
    """Where the per-layer error grows most, tied to the census's outlier layers."""
    jumps = row.get("layer_err_jumps")
    if isinstance(jumps, str) and jumps:
        pairs = [(int(j.split(":")[0]), j.split(":")[1]) for j in jumps.split()]
    elif _num(row.get("layer_err_worst")) is not None:
        pairs = [(int(row["layer_err_worst"]), "")]
    else:
        return []
    li = (s.get("max_linear_input") or {}).get("layer")
    notes = []
    for layer, inc in pairs:
        tag = " (largest linear-input outlier)" if layer == li else (
            " (outlier layer)" if layer in (s.get("outlier_layers") or []) else "")
        notes.append(f"layer {layer} {inc}{tag}".replace("  ", " ").strip())
    err = _num(row.get("layer_err_max"))
    return ["relative layer-output error grows most at " + ", ".join(notes)
            + (f"; max {err:.3g}" if err is not None else "")]


def _order(df: pd.DataFrame) -> pd.DataFrame:
    d = df.assign(_b=pd.to_numeric(df["bits_per_weight"], errors="coerce").fillna(float("inf")),
                  _p=pd.to_numeric(df.get("delta_ppl_pct"), errors="coerce").fillna(float("inf")),
                  _k=pd.to_numeric(df.get("kl"), errors="coerce").fillna(float("inf")))
    return d.sort_values(["_b", "_p", "_k", "recipe"], kind="stable")


def recommend(df: pd.DataFrame, tol: Tolerance, census: dict | None = None,
              recipes: dict[str, dict] | None = None) -> Recommendation:
    """The smallest passing recipe of `df` (results table) and a verdict for every smaller one."""
    if "recipe" not in df.columns or "bits_per_weight" not in df.columns:
        return Recommendation(None, tol, [], None, "the table has no recipe/bits_per_weight columns")
    ok = df[df["status"] == "ok"] if "status" in df.columns else df
    fp, tasks = _fp_row(ok), task_names(ok)
    verdicts, chosen = [], None
    for _, row in _order(ok).iterrows():
        is_ref = fp is not None and row["recipe"] == fp["recipe"]
        reasons = [] if is_ref else _check(row, fp, tol, tasks)  # FP is the reference: within tolerance by definition
        v = Verdict(row["recipe"], _num(row["bits_per_weight"]), not reasons, reasons)
        if reasons:
            v.causes = explain_causes((recipes or {}).get(row["recipe"]), row, census)
        verdicts.append(v)
        if not reasons:
            chosen = row["recipe"]
            break
    skipped = [r for r in df["recipe"] if r not in set(ok["recipe"])]
    note = f"not evaluated: {', '.join(skipped)}" if skipped else ""
    spec = (recipes or {}).get(chosen) if chosen else None
    snippet = yaml.safe_dump({"recipes": [spec]}, sort_keys=False) if spec else (
        f"recipes:\n  - {chosen}\n" if chosen else None)
    return Recommendation(chosen, tol, verdicts, snippet, note)


def render(rec: Recommendation) -> str:
    t = rec.tolerance
    head = f"tolerance: perplexity +{t.max_ppl_increase_pct:g}% of FP" + (
        f", task {t.task_metric} >= {t.min_task_retention_pct:g}% of FP" if t.min_task_retention_pct else "")
    lines = ["Recommendation", head]
    if rec.chosen is None:
        lines.append("no recipe meets the tolerance" + ("" if rec.verdicts else " (no evaluated rows)")
                     + (" and no FP row was found to fall back on" if rec.verdicts else ""))
    else:
        v = rec.verdicts[-1]
        bits = f"{v.bits_per_weight:.2f}" if v.bits_per_weight is not None else "?"
        lines.append(f"-> {rec.chosen} ({bits} bits/weight): the smallest recipe within tolerance")
    for v in rec.verdicts:
        if v.passed:
            continue
        bits = f"{v.bits_per_weight:.2f}" if v.bits_per_weight is not None else "?"
        lines.append(f"  x {v.recipe} ({bits} bits/weight) fails: " + "; ".join(v.reasons))
        lines += [f"      why: {c}" for c in v.causes]
    if rec.note:
        lines.append(f"  ({rec.note})")
    if rec.snippet:
        lines += ["config to reproduce it:", *("  " + ln for ln in rec.snippet.rstrip().splitlines())]
    return "\n".join(lines)
