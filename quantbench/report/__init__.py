"""Tables, plots, HTML report, cross-run comparison and the recipe recommendation."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import yaml

from ..core.log import log
from .html import write_html
from .hardware import Target
from .recommend import Recommendation, Tolerance, recommend, recommend_on


def run_recipe_specs(run_dir: Path) -> dict:
    """The run's recipes (name -> Recipe) from its resolved config.yaml; entries that no longer validate are left
    out (their hardware is then unknown unless a preset has their name)."""
    cfg = run_dir / "config.yaml"
    if not cfg.exists():
        return {}
    from ..quant.spec import Recipe

    out = {}
    for r in (yaml.safe_load(cfg.read_text()) or {}).get("recipes", []):
        if isinstance(r, dict) and "name" in r:
            try:
                out[r["name"]] = Recipe.model_validate(r)
            except ValueError:
                continue
    return out


def run_recipes(run_dir: Path) -> dict[str, dict]:
    """Recipe specs by name from the run's resolved config.yaml (for the reproduce snippet)."""
    cfg = run_dir / "config.yaml"
    if not cfg.exists():
        return {}
    from ..quant.spec import Recipe

    data = yaml.safe_load(cfg.read_text()) or {}
    out = {}
    for r in data.get("recipes", []):
        if isinstance(r, dict) and "name" in r:
            try:  # what differs from the defaults, plus each spec's bits/granularity, so it stays short
                rec = Recipe.model_validate(r)
                short = rec.model_dump(mode="json", exclude_defaults=True)
                for part in ("weights", "activations", "kv"):
                    spec = getattr(rec, part)
                    if spec is not None:
                        short[part] = {"bits": spec.bits, "granularity": spec.granularity, **short.get(part, {})}
                        if part == "activations":
                            short[part].setdefault("dynamic", spec.dynamic)
                out[r["name"]] = short
            except ValueError:
                out[r["name"]] = r
    return out


def read_census(run_dir: Path) -> dict | None:
    """The run's census, or None when it is missing or damaged (`quantbench run` recomputes it)."""
    from ..core.fileio import read_json_or_none

    return read_json_or_none(run_dir / "census.json")


def with_unit_data(run_dir: Path, df: pd.DataFrame) -> pd.DataFrame:
    """Add the per-unit / per-document lists of rows.jsonl to a table read from results.csv (they are
    what pairwise intervals between recipes need); unchanged when already there or not available."""
    rows_path = run_dir / "rows.jsonl"
    if "unit_nll" in df.columns or not rows_path.exists() or "recipe" not in df.columns:
        return df
    rows: dict[str, dict] = {}
    for line in rows_path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by an interruption
        if isinstance(r, dict) and "recipe" in r:
            rows[r["recipe"]] = {k: v for k, v in r.items() if k == "recipe" or isinstance(v, list)}
    if not rows:
        return df
    lists = pd.DataFrame(list(rows.values()))
    return df.merge(lists[["recipe"] + [c for c in lists.columns if c != "recipe" and c not in df.columns]],
                    on="recipe", how="left")


def recommend_run(run_dir: Path, df: pd.DataFrame, tol: Tolerance, target: Target | None = None) -> Recommendation:
    """The run's recommendation; with `target`, among the rows whose recipe runs there (quantbench.report.hardware)."""
    df = with_unit_data(run_dir, df)
    if target is None:
        return recommend(df, tol, read_census(run_dir), run_recipes(run_dir))
    return recommend_on(df, tol, target, run_recipe_specs(run_dir), read_census(run_dir), run_recipes(run_dir))


def finish_report(out: Path, df: pd.DataFrame, cfg) -> Recommendation:
    """End of `quantbench run`: recommendation (printed and saved) and report.html."""
    r = cfg.recommend
    tol = Tolerance(r.max_ppl_increase_pct, r.min_task_retention_pct, cfg.tasks.metric)
    rec = recommend_run(out, df, tol)
    text = rec.text()
    from ..core.fileio import atomic_write_text

    atomic_write_text(out / "recommendation.txt", text + "\n")
    path = write_html(df, out, text, cfg.tasks.metric)
    print("\n" + text)
    log(f"report: {path}")
    return rec


__all__ = ["finish_report", "recommend_run", "run_recipes", "read_census", "Tolerance", "recommend"]
