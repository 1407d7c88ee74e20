"""Result rows -> pandas table -> CSV / Markdown."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

COLUMNS = ["recipe", "status", "mode", "bits_per_weight", "size_mb", "ppl", "delta_ppl_pct", "kl", "top1",
           "eval_tok_s", "calib_s", "wall_s"]


def to_frame(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    for c in COLUMNS:
        if c not in df.columns:
            df[c] = None
    extra = [c for c in df.columns if c not in COLUMNS]
    return df[COLUMNS + extra]


def markdown(df: pd.DataFrame, columns: list[str] = COLUMNS) -> str:
    return df[columns].to_markdown(index=False, floatfmt=".4g")


def write_tables(df: pd.DataFrame, out: Path) -> None:
    df.to_csv(out / "results.csv", index=False)
    (out / "results.md").write_text(markdown(df) + "\n")
