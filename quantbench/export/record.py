"""Record exports in the run directory: the recipe's row in rows.jsonl gets the export columns (a new
line that supersedes the old one, as resumed rows do), results.csv/.md and report.html are
rewritten, and exports.md lists every export of the run with the simulated numbers beside it.

`export_reproduces_row`: the re-applied simulated model's perplexity equals the one the sweep
measured (relative difference <= 1e-4; thread counts may change float summation order).
"""
from __future__ import annotations

from pathlib import Path

from ..core import fileio
from ..core.log import log
from ..report.tables import EXPORT_COLUMNS, to_frame, write_tables
from ..run.config import RunConfig

ROW_TOL = 1e-4


def load_run_rows(run_dir: Path) -> dict[str, dict]:
    return fileio.latest_by_recipe(fileio.RowStore(run_dir / "rows.jsonl").load())


def _append(run_dir: Path, row: dict) -> None:
    fileio.RowStore(run_dir / "rows.jsonl").append(row)


def row_check(run_dir: Path, name: str, sim_ppl: float) -> dict:
    """The measured row's perplexity beside the re-applied simulated model's."""
    row = load_run_rows(run_dir).get(name) or {}
    row_ppl = row.get("ppl") if row.get("status") == "ok" else None
    return {"export_row_ppl": row_ppl,
            "export_reproduces_row": None if row_ppl is None else abs(sim_ppl / row_ppl - 1) <= ROW_TOL}


def record_export(run_dir: Path, cfg: RunConfig, name: str, cols: dict) -> dict:
    """Merge `cols` into the recipe's row (if the sweep measured it) and refresh the tables and report."""
    rows = load_run_rows(run_dir)
    row = rows.get(name)
    if row is None or row.get("status") != "ok":
        log(f"export {name}: the run has no measured row for it; export columns kept in the export folder only")
        return cols
    row = {k: v for k, v in row.items() if not k.startswith("export_")}
    row.update(cols)
    _append(run_dir, row)
    rows[name] = row
    refresh_reports(run_dir, cfg, rows)
    return cols


def refresh_reports(run_dir: Path, cfg: RunConfig, rows: dict[str, dict]) -> None:
    from ..report.html import write_html

    df = to_frame([rows[r.name] for r in cfg.recipes if r.name in rows], {r.name: r for r in cfg.recipes})
    write_tables(df, run_dir)
    rec = run_dir / "recommendation.txt"
    write_html(df, run_dir, rec.read_text() if rec.exists() else None, cfg.tasks.metric)
    cols = ["recipe", "bits_per_weight", "size_mb", "ppl"] + [c for c in EXPORT_COLUMNS if c in df.columns] + \
        [c for c in ("export_reproduces_row", "export_runtime", "export_torchao", "export_llama_cpp", "export_vllm")
         if c in df.columns]
    exported = df[df["export_verified"].notna()] if "export_verified" in df.columns else df.iloc[:0]
    if len(exported):
        fileio.atomic_write_text(run_dir / "exports.md", exported[cols].to_markdown(index=False, floatfmt=".5g") + "\n")
