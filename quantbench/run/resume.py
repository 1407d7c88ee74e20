"""Resuming a run directory: which finished rows are kept, which are stale (other inputs or another
recipe), and the files that belong to them."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from ..core import fileio
from ..core.log import log
from .config import RunConfig
from .manifest import changed_inputs

if TYPE_CHECKING:
    from .prepare import Prepared


STATE = "inputs.json"  # the keys of what the rows and the census in this directory were computed from


CENSUS_FILES = ("census.json", "census.md")


TABLE_FILES = ("results.csv", "results.md", "layers.csv", "recommendation.txt", "report.html")


def write_json(path: Path, obj) -> None:
    fileio.atomic_write_json(path, obj)


def load_rows(path: Path) -> dict[str, dict]:
    """The last row of each recipe in a rows.jsonl (read only; a cut last line is ignored)."""
    return fileio.latest_by_recipe(fileio.read_rows(path))


def recipe_key(recipe) -> str:
    return json.dumps(recipe.model_dump(mode="json"), sort_keys=True)


def resume_rows(out: Path, store: fileio.RowStore, p: "Prepared", cfg: RunConfig) -> dict[str, dict]:
    """Finished rows of the same recipe and inputs. Rows from other inputs are moved to
    rows.stale.jsonl (never mixed with new ones) and the tables made from them deleted; a stale
    or damaged census is deleted."""
    state = fileio.read_json_or_none(out / STATE) or {}
    rows = store.load()
    keep = [r for r in rows if r.get("inputs_key") == p.rows_key]
    stale = [r for r in rows if r.get("inputs_key") != p.rows_key]
    if stale:
        what = changed_inputs(state.get("inputs", {}), p.inputs) if state.get("inputs") else []
        fileio.RowStore(out / fileio.STALE_ROWS).append_many(stale)
        store.rewrite(keep)
        log(f"inputs changed since {len(stale)} row(s) were computed ({', '.join(what[:4]) or 'unknown inputs'}): "
            f"they were moved to {fileio.STALE_ROWS} and are recomputed")
        for name in TABLE_FILES:
            (out / name).unlink(missing_ok=True)
    census_ok = fileio.read_json_or_none(out / "census.json") is not None and state.get("census_key") == p.census_key
    if not census_ok and (out / "census.json").exists():
        log("census.json is damaged or from other inputs: discarded" + (", recomputed" if p.census_batches is not None else ""))
    if not census_ok:  # census.md and the plots belong to the census.json they were made with
        for f in [out / name for name in CENSUS_FILES] + sorted(out.glob("census_*.png")):
            f.unlink(missing_ok=True)
    keys = {r.name: recipe_key(r) for r in cfg.recipes}  # a changed recipe is recomputed
    done = {k: v for k, v in fileio.latest_by_recipe(keep).items()
            if v.get("status") == "ok" and v.get("recipe_key") == keys.get(k)}
    if done:
        log(f"resuming: {len(done)} finished row(s) kept ({', '.join(done)})")
    return done

