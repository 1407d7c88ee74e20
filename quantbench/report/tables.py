"""Result rows -> pandas table (+ paired 95% intervals) -> CSV / Markdown (+ the per-layer table in long format).

Intervals (quantbench.eval.intervals) are computed here from the per-unit lists every row carries
(unit_nll, unit_tokens, unit_kl per block of ci_block tokens; doc_<metric>:<task> per document),
paired with the FP row: delta_ppl_lo/hi (percent), kl_lo/hi (nats/token), acc_delta_lo/hi:<task>
(change of the run's task metric vs FP, in accuracy units), task_delta_lo/hi (the same for the mean
over tasks) and ci_units (number of blocks). The lists themselves stay in rows.jsonl only.
"""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import yaml

from ..eval import intervals as stats
from .hardware import hardware_by_name

COLUMNS = ["recipe", "status", "mode", "bits_per_weight", "size_mb", "compression_x", "ppl", "delta_ppl_pct",
           "delta_ppl_lo", "delta_ppl_hi", "word_ppl", "kl", "kl_lo", "kl_hi", "top1", "kld_p99",
           "layer_err_max", "layer_err_jumps", "sink_drift", "task_acc_mean", "task_delta_lo", "task_delta_hi",
           "ci_units", "eval_tok_s", "peak_mem_mb", "calib_s", "wall_s"]
TERMINAL = ["recipe", "status", "bits_per_weight", "ppl", "delta_ppl_pct", "delta_ppl_lo", "delta_ppl_hi", "kl",
            "top1", "task_acc_mean", "eval_tok_s"]
LIST_COLUMNS = ("layer_rel_error", "layer_sink", "unit_nll", "unit_tokens", "unit_kl", "unit_top1")
TASK_PREFIXES = ("acc:", "acc_norm:", "acc_se:", "n:", "acc_delta_lo:", "acc_delta_hi:")
# llama.cpp's `perplexity --kl-divergence` statistics (quantbench.eval.kld); "same top p" is `top1`
KLD_REPORT = ["kl", "kld_median", "kld_p99", "kld_p999", "kld_max", "dp_rms", "top1"]
# written by `quantbench export` (quantbench/export): the real checkpoint, beside the simulated columns
EXPORT_COLUMNS = ["export_format", "export_verified", "export_ppl", "export_sim_ppl", "export_ppl_delta_pct",
                  "export_logit_maxdiff", "export_weights_equal", "export_file_mb", "export_load_s", "export_load_mb",
                  "export_tok_s", "export_torchao_tok_s", "export_llama_cpp_ppl", "export_llama_cpp_tok_s",
                  "export_vllm_ppl", "export_vllm_tok_s"]


def num(v) -> float | None:
    """A table cell as a float, or None (missing, not a number, NaN)."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def task_names(df: pd.DataFrame) -> list[str]:
    """Tasks that have an accuracy column (acc:<task>)."""
    return [c.split(":", 1)[1] for c in df.columns if c.startswith("acc:")]


def task_columns(df: pd.DataFrame) -> list[str]:
    """Per-task columns of the table, grouped by task."""
    return [c for t in task_names(df) for c in (p + t for p in TASK_PREFIXES) if c in df.columns]


def as_list(v) -> list | None:
    return v if isinstance(v, list) and v else None


def fp_row(rows: list[dict]) -> dict | None:
    return next((r for r in rows if r.get("mode") == "fp" and r.get("status") == "ok"), None)


def row_intervals(row: dict, fp: dict | None, tasks: list[str]) -> dict:
    """Paired 95% intervals of one row against the FP row, from their per-unit lists (empty if absent)."""
    if fp is None or row.get("status") != "ok":
        return {}
    is_fp = row is fp
    out: dict = {}
    tok, nll, ref_nll = as_list(row.get("unit_tokens")), as_list(row.get("unit_nll")), as_list(fp.get("unit_nll"))
    if tok and nll and ref_nll and tok == as_list(fp.get("unit_tokens")):
        iv = stats.ppl_change(nll, ref_nll, tok)
        out.update(delta_ppl_lo=iv.lo, delta_ppl_hi=iv.hi, ci_units=len(tok))
        kl = as_list(row.get("unit_kl"))
        if kl:
            k = stats.ratio_of_sums(kl, tok)
            out.update(kl_lo=k.lo, kl_hi=k.hi)
    metric = row.get("task_metric") if isinstance(row.get("task_metric"), str) else "acc"
    pairs = []
    for t in tasks:
        c, r = as_list(row.get(f"doc_{metric}:{t}")), as_list(fp.get(f"doc_{metric}:{t}"))
        if c and r and len(c) == len(r):
            iv = stats.accuracy_delta(c, r)
            out[f"acc_delta_lo:{t}"], out[f"acc_delta_hi:{t}"] = (0.0, 0.0) if is_fp else (iv.lo, iv.hi)
            pairs.append((c, r))
    if pairs and len(pairs) == len(tasks):
        iv = stats.mean_accuracy_delta(pairs)
        out["task_delta_lo"], out["task_delta_hi"] = (0.0, 0.0) if is_fp else (iv.lo, iv.hi)
    return out


def _clean(v):
    return None if isinstance(v, float) and math.isnan(v) else v


def to_frame(rows: list[dict], recipes: dict | None = None) -> pd.DataFrame:
    """One row per recipe; the fixed columns first (missing ones empty), then task columns, then the rest.
    Interval columns are computed from the rows' per-unit lists when the FP row has them too. `hardware`: where
    each recipe runs, from its spec in `recipes` (name -> Recipe, the run's config), else the preset's."""
    rows = [{k: _clean(v) for k, v in r.items()} for r in rows]
    fp = fp_row(rows)
    tasks = sorted({k.split(":", 1)[1] for r in rows for k in r if k.startswith("acc:")})
    rows = [{**r, **row_intervals(r, fp, tasks)} for r in rows]
    df = pd.DataFrame(rows)
    for c in COLUMNS:
        if c not in df.columns:
            df[c] = None
    bpw = pd.to_numeric(df["bits_per_weight"], errors="coerce")
    df["compression_x"] = (16.0 / bpw).round(3)  # vs every parameter stored in 16 bits
    df["hardware"] = [hardware_by_name(r, recipes) for r in df["recipe"]]  # from the recipe's spec, not stored in rows
    tcols = task_columns(df)
    extra = [c for c in df.columns if c not in COLUMNS and c not in tcols]
    return df[COLUMNS + tcols + extra]


def scalar_frame(df: pd.DataFrame) -> pd.DataFrame:
    """The table without list columns (per-layer curves, per-unit and per-document data): what CSV/Markdown hold."""
    lists = [c for c in df.columns if c in LIST_COLUMNS or c.startswith("doc_")
             or df[c].map(lambda v: isinstance(v, list)).any()]
    return df.drop(columns=lists)


def layer_frame(df: pd.DataFrame) -> pd.DataFrame:
    """Long format: recipe, layer, rel_error, sink (empty when no probe was run)."""
    recs = []
    for _, r in df.iterrows():
        errs = r.get("layer_rel_error")
        if not isinstance(errs, list):
            continue
        sinks = r.get("layer_sink") if isinstance(r.get("layer_sink"), list) else [None] * len(errs)
        recs += [{"recipe": r["recipe"], "layer": i, "rel_error": e, "sink": s}
                 for i, (e, s) in enumerate(zip(errs, sinks))]
    return pd.DataFrame(recs, columns=["recipe", "layer", "rel_error", "sink"])


def markdown(df: pd.DataFrame, columns: list[str] | None = None) -> str:
    cols = [c for c in (columns or TERMINAL) if c in df.columns]
    return df[cols].to_markdown(index=False, floatfmt=".4g")


def write_tables(df: pd.DataFrame, out: Path) -> None:
    from ..core.fileio import atomic_write_text  # every output: temporary file, then rename

    flat = scalar_frame(df)
    atomic_write_text(out / "results.csv", flat.to_csv(index=False))
    export = [c for c in EXPORT_COLUMNS if c in flat.columns]
    atomic_write_text(out / "results.md", markdown(flat, COLUMNS + task_columns(flat) + export) + "\n")
    layers = layer_frame(df)
    if len(layers):
        atomic_write_text(out / "layers.csv", layers.to_csv(index=False))


def weight_format(row: pd.Series) -> str | None:
    """'int4', 'nvfp4', 'mxfp4', 'fp8', ... of the row's quantized weights, from its recipe's content."""
    try:
        w = yaml.safe_load(str(row.get("recipe_key"))).get("weights")
    except (AttributeError, yaml.YAMLError):
        return None
    if not isinstance(w, dict):
        return None
    fmt = w.get("format", "int")
    return f"int{w.get('bits')}" if fmt == "int" else fmt
