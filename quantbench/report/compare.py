"""`quantbench compare RUN_DIR...`: one table across runs, aligned by recipe name."""
from __future__ import annotations

import csv
import io
from pathlib import Path

import pandas as pd

from ..core.errors import QuantbenchError
from ..core.fileio import latest_by_recipe, read_json_or_none, read_rows
from .tables import to_frame

METRICS = ("bits_per_weight", "ppl", "delta_ppl_pct", "kl", "top1", "task_acc_mean")


REWRITE = "rerun the same `quantbench run` command to rewrite it from rows.jsonl"


def read_results_csv(path: Path) -> pd.DataFrame:
    """results.csv, checked line by line: damage is an error naming the file and line, never an
    empty or shortened table read as if it were whole."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise QuantbenchError(f"cannot read {path}: [Errno {e.errno}] {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise QuantbenchError(f"{path} line {line} is not UTF-8 text (damaged); "
                              f"{REWRITE}") from None
    if not text.strip():
        raise QuantbenchError(f"{path} is empty; {REWRITE}")
    if not text.endswith("\n"):
        line = text.count("\n") + 1
        raise QuantbenchError(f"{path} line {line} is cut short (the file is truncated); {REWRITE}")
    reader = csv.reader(io.StringIO(text))
    try:
        header = next(reader)
        if "recipe" not in header:
            raise QuantbenchError(f"{path} line 1 is not a results header (no 'recipe' column); {REWRITE}")
        for rec in reader:
            if rec and len(rec) != len(header):
                raise QuantbenchError(f"{path} line {reader.line_num} has {len(rec)} fields, the header "
                                      f"{len(header)}; {REWRITE}")
    except csv.Error as e:
        raise QuantbenchError(f"{path} line {reader.line_num} is not valid CSV ({e}); {REWRITE}") from None
    return pd.read_csv(io.StringIO(text))


def load_run(run_dir: Path) -> pd.DataFrame:
    """A run's results table (results.csv, else rows.jsonl); damage names the file and line."""
    csv_path, rows = run_dir / "results.csv", run_dir / "rows.jsonl"
    if not run_dir.is_dir():
        raise QuantbenchError(f"{run_dir}: no such run directory")
    if csv_path.exists():
        return read_results_csv(csv_path)
    if rows.exists():
        recs = read_rows(rows)
        if not recs:
            raise QuantbenchError(f"{rows} holds no rows yet (the run finished no recipe); rerun it")
        return to_frame(list(latest_by_recipe(recs).values()))
    if (run_dir / "config.yaml").exists():  # started, stopped before its first row
        raise QuantbenchError(f"{run_dir} holds no rows yet (the run finished no recipe); rerun it")
    raise QuantbenchError(f"{run_dir}: not a run directory (no results.csv or rows.jsonl)")


def _labels(dirs: list[Path]) -> list[str]:
    names = [d.name for d in dirs]
    return [n if names.count(n) == 1 else str(d) for n, d in zip(names, dirs)]


def compare(run_dirs: list[Path], metrics: tuple[str, ...] = METRICS) -> pd.DataFrame:
    """Rows: recipes (first-seen order); columns: '<metric> [<run>]'. Missing recipe/metric: empty."""
    if not run_dirs:
        raise QuantbenchError("compare needs at least one run directory")
    seen: dict[Path, Path] = {}
    for d in run_dirs:
        if d.resolve() in seen:
            raise QuantbenchError(f"compare: {d} is the same run as {seen[d.resolve()]}; give each run once")
        seen[d.resolve()] = d
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
        man = read_json_or_none(d / "manifest.json")
        if man is None:
            lines.append(f"{label}: no readable manifest.json")
            continue
        p = man.get("eval_protocol", {})
        lines.append(f"{label}: model {man.get('model', {}).get('source')}, corpus {man.get('corpus', {}).get('name')}, "
                     f"{p.get('windows')}x{p.get('seq_len')} tokens, dtype {man.get('dtype')}")
    return lines
