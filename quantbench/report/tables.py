"""Result rows -> pandas table -> CSV / Markdown (+ the per-layer table in long format)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

COLUMNS = ["recipe", "status", "mode", "bits_per_weight", "size_mb", "compression_x", "ppl", "delta_ppl_pct",
           "word_ppl", "kl", "top1", "layer_err_max", "layer_err_jumps", "sink_drift", "task_acc_mean", "eval_tok_s", "peak_mem_mb",
           "calib_s", "wall_s"]
TERMINAL = ["recipe", "status", "bits_per_weight", "ppl", "delta_ppl_pct", "kl", "top1", "task_acc_mean",
            "eval_tok_s"]
LIST_COLUMNS = ("layer_rel_error", "layer_sink")
# written by `quantbench export` (quantbench/export): the real checkpoint, beside the simulated columns
EXPORT_COLUMNS = ["export_format", "export_verified", "export_ppl", "export_sim_ppl", "export_ppl_delta_pct",
                  "export_logit_maxdiff", "export_weights_equal", "export_file_mb", "export_load_s", "export_load_mb",
                  "export_tok_s", "export_torchao_tok_s", "export_llama_cpp_ppl", "export_llama_cpp_tok_s"]


def task_names(df: pd.DataFrame) -> list[str]:
    """Tasks that have an accuracy column (acc:<task>)."""
    return [c.split(":", 1)[1] for c in df.columns if c.startswith("acc:")]


def to_frame(rows: list[dict]) -> pd.DataFrame:
    """One row per recipe; the fixed columns first (missing ones empty), then task columns, then the rest."""
    df = pd.DataFrame(rows)
    for c in COLUMNS:
        if c not in df.columns:
            df[c] = None
    bpw = pd.to_numeric(df["bits_per_weight"], errors="coerce")
    df["compression_x"] = (16.0 / bpw).round(3)  # vs every parameter stored in 16 bits
    tasks = [c for t in task_names(df) for c in (f"acc:{t}", f"acc_norm:{t}", f"acc_se:{t}", f"n:{t}") if c in df.columns]
    extra = [c for c in df.columns if c not in COLUMNS and c not in tasks]
    return df[COLUMNS + tasks + extra]


def scalar_frame(df: pd.DataFrame) -> pd.DataFrame:
    """The table without per-layer list columns (what CSV/Markdown hold)."""
    return df.drop(columns=[c for c in LIST_COLUMNS if c in df.columns])


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
    flat = scalar_frame(df)
    flat.to_csv(out / "results.csv", index=False)
    tasks = [c for c in flat.columns if c.startswith(("acc:", "acc_norm:", "acc_se:", "n:"))]
    export = [c for c in EXPORT_COLUMNS if c in flat.columns]
    (out / "results.md").write_text(markdown(flat, COLUMNS + tasks + export) + "\n")
    layers = layer_frame(df)
    if len(layers):
        layers.to_csv(out / "layers.csv", index=False)
