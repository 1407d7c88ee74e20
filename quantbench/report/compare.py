"""`quantbench compare RUN_DIR...`: one table across runs, aligned by recipe name."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from ..errors import QuantbenchError
from .tables import to_frame

METRICS = ("bits_per_weight", "ppl", "delta_ppl_pct", "kl", "top1", "task_acc_mean")


def load_run(run_dir: Path) -> pd.DataFrame:
    """A run's results table (results.csv, else rows.jsonl)."""
    csv, rows = run_dir / "results.csv", run_dir / "rows.jsonl"
    if csv.exists():
        return pd.read_csv(csv)
    if rows.exists():
        recs = [json.loads(ln) for ln in rows.read_text().splitlines() if ln.strip().startswith("{")]
        return to_frame(list({r["recipe"]: r for r in recs}.values()))
    raise QuantbenchError(f"{run_dir}: not a run directory (no results.csv or rows.jsonl)")


def _labels(dirs: list[Path]) -> list[str]:
    names = [d.name for d in dirs]
    return [n if names.count(n) == 1 else str(d) for n, d in zip(names, dirs)]


def compare(run_dirs: list[Path], metrics: tuple[str, ...] = METRICS) -> pd.DataFrame:
    """Rows: recipes (first-seen order); columns: '<metric> [<run>]'. Missing recipe/metric: empty."""
    if not run_dirs:
        raise QuantbenchError("compare needs at least one run directory")
    labels = _labels(run_dirs)
    frames = []
    for d, label in zip(run_dirs, labels):
        df = load_run(d)
        if "status" in df.columns:
            df = df[df["status"] == "ok"]
        cols = [m for m in metrics if m in df.columns]
        frames.append(df.set_index("recipe")[cols].rename(columns=lambda c, lb=label: f"{c} [{lb}]"))
    order = list(dict.fromkeys(r for f in frames for r in f.index))
    table = pd.concat(frames, axis=1).reindex(order)
    by_metric = [c for m in metrics for lb in labels for c in table.columns if c == f"{m} [{lb}]"]
    return table[by_metric].reset_index().rename(columns={"index": "recipe"})


def run_context(run_dirs: list[Path]) -> list[str]:
    """One line per run: model, corpus and protocol, so a reader sees what differs."""
    lines = []
    for d, label in zip(run_dirs, _labels(run_dirs)):
        m = d / "manifest.json"
        if not m.exists():
            lines.append(f"{label}: no manifest")
            continue
        man = json.loads(m.read_text())
        p = man.get("eval_protocol", {})
        lines.append(f"{label}: model {man.get('model', {}).get('source')}, corpus {man.get('corpus', {}).get('name')}, "
                     f"{p.get('windows')}x{p.get('seq_len')} tokens, dtype {man.get('dtype')}")
    return lines
