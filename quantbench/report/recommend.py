"""Pick the smallest recipe that stays within tolerance of the FP model, and say why smaller ones fail.

Rule (MLPerf's "99% of FP" spirit), applied at the 95% interval's bound: a recipe passes when the
upper bound of its perplexity increase over FP is at most `max_ppl_increase_pct` and, if
`min_task_retention_pct` is set, on every task the lower bound of its accuracy change vs FP is at
least -(1 - retention) x FP's accuracy (it keeps that share of FP's score on these documents).
Without intervals (old runs) the point estimates decide, and the text says so. Candidates are
ordered by bits per weight (smallest first); ties go to the lower perplexity increase, then the
lower KL, then the name. A recipe with a metric the tolerance needs but the table lacks fails
("not measured"). FP always passes, so when no quantized recipe does, the answer is FP (16 bits).
The uncertainty notes (quantbench.report.uncertainty) say which recipes cannot be told apart at
this sample size and what the task documents can show.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd
import yaml

from ..core.errors import QuantbenchError
from ..eval.intervals import n_to_resolve
from .hardware import Target, recipe_needs, targets_for
from .tables import num as _num
from .tables import task_names, weight_format
from .uncertainty import uncertainty_notes

Z95 = 1.96


@dataclass(frozen=True)
class Tolerance:
    max_ppl_increase_pct: float = 2.0
    min_task_retention_pct: float | None = None
    task_metric: str = "acc"

    def __post_init__(self) -> None:
        m, r = self.max_ppl_increase_pct, self.min_task_retention_pct
        if not isinstance(m, (int, float)) or not math.isfinite(m) or m < 0:
            raise QuantbenchError(f"max perplexity increase must be a finite percentage >= 0, got {m}")
        if r is not None and (not isinstance(r, (int, float)) or not math.isfinite(r) or not 0 < r <= 100):
            raise QuantbenchError(f"min task retention must be a percentage in (0, 100], got {r}")
        if self.task_metric not in ("acc", "acc_norm"):
            raise QuantbenchError(f"task metric must be acc or acc_norm, got {self.task_metric!r}")


@dataclass
class Verdict:
    recipe: str
    bits_per_weight: float | None
    passed: bool
    reasons: list[str] = field(default_factory=list)
    causes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class TargetSplit:
    """The rows of a table for one target: which run there, which are set aside and why."""

    target: Target
    runs: list[str]
    aside: list[str]  # their format has no runtime on this target
    unknown: list[str]  # hardware unknown: not a preset and no spec in the run's config
    hardware: dict[str, str]  # recipe -> where it runs (the table's `hardware` label)


@dataclass
class Recommendation:
    chosen: str | None
    tolerance: Tolerance
    verdicts: list[Verdict]
    snippet: str | None
    note: str = ""
    notes: list[str] = field(default_factory=list)  # uncertainty: what this sample size can and cannot show
    target: TargetSplit | None = None  # `--target`: chosen among the rows that run there
    equal_bits: list[str] = field(default_factory=list)  # the best row of each weight format, per W/A class

    def text(self) -> str:
        return render(self)



def _fp_row(df: pd.DataFrame) -> pd.Series | None:
    fp = df[(df.get("mode") == "fp") | (df["recipe"] == "fp")] if "mode" in df.columns else df[df["recipe"] == "fp"]
    return fp.iloc[0] if len(fp) else None


def se_of(lo: float, hi: float) -> float:
    """Standard error implied by a 95% interval's width (what the sample-size estimates use)."""
    return (hi - lo) / (2 * Z95)


def _units_phrase(row: pd.Series) -> tuple[int | None, str]:
    n, block = _num(row.get("ci_units")), _num(row.get("ci_block"))
    return (int(n) if n else None), (f"blocks of {int(block)} tokens" if block else "blocks of tokens")


def _ppl_reason(row: pd.Series, tol: Tolerance) -> str | None:
    d, lo, hi = (_num(row.get(c)) for c in ("delta_ppl_pct", "delta_ppl_lo", "delta_ppl_hi"))
    if d is None:
        return "perplexity not measured"
    t = tol.max_ppl_increase_pct
    if (hi if hi is not None else d) <= t:
        return None
    iv = (f"; 95% interval {lo:+.2f}..{hi:+.2f}%" if lo is not None and hi is not None
          else "; no interval: point estimate")
    if d > t:
        return (f"perplexity +{d:.2f}% > +{t:g}% allowed (over by {d - t:.2f} points; "
                f"ppl {_num(row.get('ppl')) or float('nan'):.3f}{iv})")
    n, what = _units_phrase(row)
    need = n_to_resolve(n, se_of(lo, hi), t - d) if n else None
    return (f"perplexity +{d:.2f}% is within +{t:g}% but its 95% upper bound +{hi:.2f}% is not: not shown at "
            f"this sample size" + (f" (~{need} {what} would show it if the true change is +{d:.2f}%)" if need else ""))


def _task_reason(row: pd.Series, fp: pd.Series | None, tol: Tolerance, t: str) -> str | None:
    col = f"{tol.task_metric}:{t}"
    q, ref = _num(row.get(col)), _num(fp.get(col)) if fp is not None else None
    if q is None or ref is None or ref <= 0:
        return f"{t}: accuracy not measured" + (" for FP" if q is not None else "")
    r = tol.min_task_retention_pct
    kept, allowed = 100 * q / ref, (1 - r / 100) * ref  # allowed: largest loss in accuracy points
    lo, hi = _num(row.get(f"acc_delta_lo:{t}")), _num(row.get(f"acc_delta_hi:{t}"))
    if isinstance(row.get("task_metric"), str) and row.get("task_metric") != tol.task_metric:
        lo = hi = None  # the intervals are of the run's metric, not this one
    head = f"{t}: accuracy {q:.3f} = {kept:.1f}% of FP {ref:.3f}"
    if kept < r:
        se = _num(row.get(f"acc_se:{t}"))
        iv = f"; change 95% interval {lo:+.3f}..{hi:+.3f}" if lo is not None and hi is not None else (
            f"; stderr {se:.3f}" if se else "")
        return f"{head} < {r:g}% (short by {r - kept:.1f} points{iv})"
    if lo is None or hi is None or lo >= -allowed:
        return None
    n = _num(row.get(f"n:{t}"))
    need = n_to_resolve(int(n), se_of(lo, hi), allowed + (q - ref)) if n else None
    return (f"{head}, but the 95% lower bound of its change, {lo:+.3f}, allows a loss beyond the {allowed:.3f} that "
            f"{r:g}% retention permits: not shown with {int(n or 0)} documents"
            + (f" (~{need} would show it if the true change is {q - ref:+.3f})" if need else ""))


def _check(row: pd.Series, fp: pd.Series | None, tol: Tolerance, tasks: list[str]) -> list[str]:
    reasons = [r for r in [_ppl_reason(row, tol)] if r]
    if tol.min_task_retention_pct is None:
        return reasons
    if not tasks:
        return reasons + ["task accuracy not measured (no tasks in this run)"]
    return reasons + [r for t in tasks if (r := _task_reason(row, fp, tol, t))]


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
    notes = uncertainty_notes(_order(ok), fp, chosen, tol, tasks)
    return Recommendation(chosen, tol, verdicts, snippet, note, notes, equal_bits=equal_bits(ok))


def equal_bits(df: pd.DataFrame) -> list[str]:
    """One line per W/A class that holds more than one weight format (e.g. W4A16: int4, nvfp4, mxfp4):
    the best row of each format by perplexity increase, with its interval and bits/weight, so INT, FP8 and
    FP4 recipes are compared at equal bits rather than across sizes."""
    q = _quantized_ok(df)
    if q.empty or not {"w_bits", "recipe_key", "delta_ppl_pct"} <= set(q.columns):
        return []
    q = q.assign(_fmt=q.apply(weight_format, axis=1), _w=pd.to_numeric(q["w_bits"], errors="coerce"),
                 _a=pd.to_numeric(q.get("a_bits"), errors="coerce"),
                 _p=pd.to_numeric(q["delta_ppl_pct"], errors="coerce")).dropna(subset=["_fmt", "_w", "_p"])
    lines = []
    for (w, a), g in q.groupby(["_w", q["_a"].fillna(16)], sort=True):
        best = g.sort_values(["_p", "recipe"]).groupby("_fmt", sort=False).head(1)
        if best["_fmt"].nunique() < 2:
            continue
        parts = []
        for _, r in best.iterrows():
            lo, hi = _num(r.get("delta_ppl_lo")), _num(r.get("delta_ppl_hi"))
            ci = f" [{lo:+.1f}, {hi:+.1f}]" if lo is not None and hi is not None else ""
            parts.append(f"{r['_fmt']} {r['recipe']} {r['_p']:+.1f}%{ci} ({_num(r['bits_per_weight']):.2f} b/w)")
        lines.append(f"W{int(w)}A{int(a)}: " + "; ".join(parts))
    return lines


def render(rec: Recommendation) -> str:
    t = rec.tolerance
    head = f"tolerance (at the 95% interval's bound): perplexity +{t.max_ppl_increase_pct:g}% of FP" + (
        f", task {t.task_metric} >= {t.min_task_retention_pct:g}% of FP" if t.min_task_retention_pct else "")
    lines = ["Recommendation", head] + ([_target_line(rec.target)] if rec.target else [])
    if rec.chosen is None:
        lines.append("no recipe meets the tolerance" + ("" if rec.verdicts else " (no evaluated rows)")
                     + (" and no FP row was found to fall back on" if rec.verdicts else ""))
    else:
        v = rec.verdicts[-1]
        bits = f"{v.bits_per_weight:.2f}" if v.bits_per_weight is not None else "?"
        where = (f" that runs on {rec.target.target.name} ({rec.target.hardware.get(rec.chosen)})"
                 if rec.target else "")
        lines.append(f"-> {rec.chosen} ({bits} bits/weight): the smallest recipe within tolerance{where}")
    for v in rec.verdicts:
        if v.passed:
            continue
        bits = f"{v.bits_per_weight:.2f}" if v.bits_per_weight is not None else "?"
        lines.append(f"  x {v.recipe} ({bits} bits/weight) fails: " + "; ".join(v.reasons))
        lines += [f"      why: {c}" for c in v.causes]
    if rec.note:
        lines.append(f"  ({rec.note})")
    if rec.notes:
        lines += ["uncertainty:", *(f"  {n}" for n in rec.notes)]
    if rec.equal_bits:
        lines += ["at equal bits, the best of each weight format (perplexity increase, 95% interval):",
                  *(f"  {n}" for n in rec.equal_bits)]
    if rec.snippet:
        lines += ["config to reproduce it:", *("  " + ln for ln in rec.snippet.rstrip().splitlines())]
    return "\n".join(lines)


def _names(names: list[str], most: int = 6) -> str:
    return ", ".join(names[:most]) + (f", ... ({len(names) - most} more)" if len(names) > most else "")


def _target_line(ts: TargetSplit) -> str:
    n = len(ts.aside) + len(ts.unknown)
    line = f"target: {ts.target.name} ({ts.target.what}): {n} row(s) set aside as not runnable there"
    if ts.aside:
        line += f" ({_names(ts.aside)})"
    if ts.unknown:
        line += f"; of them, hardware unknown (not a preset, no spec in the run's config): {_names(ts.unknown)}"
    return line


def split_rows(df: pd.DataFrame, t: Target, specs: dict | None = None) -> TargetSplit:
    """Which rows of `df` run on `t`, from each recipe's spec in `specs` (name -> Recipe), else its preset."""
    runs, aside, unknown, hw = [], [], [], {}
    for name in df["recipe"]:
        n = recipe_needs(name, specs)
        if n is None:
            unknown.append(name)
            continue
        hw[name] = n.label
        (runs if n.runs_on(t) else aside).append(name)
    return TargetSplit(t, runs, aside, unknown, hw)


def _quantized_ok(df: pd.DataFrame) -> pd.DataFrame:
    ok = df[df["status"] == "ok"] if "status" in df.columns else df
    fp = ok["mode"] == "fp" if "mode" in ok.columns else ok["recipe"] == "fp"
    return ok[~fp & (ok["recipe"] != "fp")]


def _elsewhere(df: pd.DataFrame, tol: Tolerance, specs: dict | None) -> str:
    """Where the best rows run: the two smallest quantized rows within tolerance that run on a known target
    (or, when none is within tolerance, the two smallest that run somewhere)."""
    ok = df[df["status"] == "ok"] if "status" in df.columns else df
    fp, tasks = _fp_row(ok), task_names(ok)
    placed = []
    for _, row in _order(_quantized_ok(df)).iterrows():
        n = recipe_needs(row["recipe"], specs)
        if n is not None and targets_for(n):
            placed.append((not _check(row, fp, tol, tasks), row["recipe"], targets_for(n)))
    if not placed:
        return "no quantized row of this run runs on any known target"
    passing = [p for p in placed if p[0]]
    head = ("the smallest rows within tolerance run on: " if passing
            else "no row within tolerance runs on a known target; the smallest that run: ")
    return head + "; ".join(f"{r} ({', '.join(w)})" for _, r, w in (passing or placed)[:2])


def recommend_on(df: pd.DataFrame, tol: Tolerance, t: Target, specs: dict | None = None, census: dict | None = None,
                 recipes: dict[str, dict] | None = None) -> Recommendation:
    """recommend() among the rows whose recipe runs on `t` (FP runs everywhere). A one-line error when no
    evaluated quantized row runs there, naming where the best rows run."""
    if "recipe" not in df.columns:
        return recommend(df, tol, census, recipes)
    split = split_rows(df, t, specs)
    kept = df[df["recipe"].isin(split.runs)]
    if _quantized_ok(kept).empty:
        raise QuantbenchError(f"no quantized recipe of this run runs on {t.name} ({t.what}); "
                              + _elsewhere(df, tol, specs))
    rec = recommend(kept, tol, census, recipes)
    rec.target = split
    return rec
