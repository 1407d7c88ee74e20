"""The sweep: config -> for each checkpoint: prepare (run/prepare.py) -> resume (run/resume.py) ->
census -> every missing (model, recipe) cell on the executor (run/cell.py) -> rows -> tables, report,
export list. The `profile` command is run/profile.py.

Rows are appended to rows.jsonl as each recipe finishes, so an interrupted sweep keeps them
and a rerun of the same command (same run directory) resumes where it stopped.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..census import run_census, write_census
from ..core import fileio
from ..core.errors import ConfigError, QuantbenchError
from ..core.log import log
from ..modeling.offload import onloaded
from ..report import finish_report
from ..report.tables import markdown, to_frame, write_tables
from . import rundir
from .cell import CellState, worker_cell
from .config import RunConfig, dump_config
from .executor import Cell, Executor, make_executor
from .prepare import Prepared, prepare
from .resume import STATE, load_rows, recipe_key, resume_rows, write_json


def run_dir_for(cfg: RunConfig, config_name: str = "run") -> Path:
    run_id = cfg.run_id or f"{config_name}-{_slug(cfg.model)}-{cfg.fingerprint()}"
    return Path(cfg.output_dir) / run_id


def run(cfg: RunConfig, config_name: str = "run") -> Path | list[Path]:
    """Run the config: its run directory (a list of them when `models` names checkpoints)."""
    outs = run_all(cfg, config_name)
    return outs if cfg.models else outs[0]


@dataclass
class _Run:
    """One checkpoint's run directory during a sweep: its config, lock, prepared inputs and rows."""

    cfg: RunConfig
    out: Path
    lock: rundir.RunLock
    p: Prepared | None = None
    store: fileio.RowStore | None = None
    done: dict | None = None


def run_all(cfg: RunConfig, config_name: str = "run") -> list[Path]:
    """Every checkpoint of the config (one run directory each): census in this process, then every
    missing (model, recipe) cell on the executor, each row appended as it arrives."""
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    runs = _plan_runs(cfg, config_name)
    ex = make_executor(cfg.executor)
    try:
        ex.start()
        for r in runs:
            _open_run(r, config_name, drop_model=ex.remote and not r.cfg.export and not r.cfg.mixed)
        states: dict[int, CellState] = {}
        lost = _sweep_all(ex, runs, states)
        if any(r.cfg.mixed for r in runs):  # census-guided mixed recipes (quantbench/mixed), after the uniform rows
            for r in runs:
                if r.cfg.mixed:
                    _add_mixed(r)
            lost += _sweep_all(ex, runs, states)
        for r in runs:
            _finish(r)
    except KeyboardInterrupt:
        for r in runs:
            if r.done is not None:
                _stopped(r.cfg, r.out, r.done)
        raise
    finally:
        ex.close()
        for r in runs:
            r.lock.release()
    for r in runs:
        log(f"results: {r.out / 'results.md'}")
    if lost:
        raise QuantbenchError(f"{len(lost)} cell(s) lost with their worker ({', '.join(lost[:4])}): their rows are "
                              "missing; rerun the same command to compute only them")
    return [r.out for r in runs]


def _plan_runs(cfg: RunConfig, config_name: str) -> list[_Run]:
    cfgs = cfg.per_model()
    if cfg.run_id and cfg.models:  # one directory per checkpoint under the chosen name
        cfgs = [c.model_copy(update={"run_id": f"{cfg.run_id}-{_slug(c.model)}"}) for c in cfgs]
    outs = [run_dir_for(c, config_name) for c in cfgs]
    if len(set(outs)) < len(outs):
        raise ConfigError("models: two checkpoints map to the same run directory; give them distinct paths")
    for out in outs:
        rundir.check_output_dir(out)
    return [_Run(c, out, rundir.RunLock(out)) for c, out in zip(cfgs, outs)]


def _open_run(r: _Run, config_name: str, drop_model: bool) -> None:
    """Lock, prepare (load and check), resume and census one checkpoint's run directory."""
    if r.out.is_dir():  # an existing run directory: say at once when another process writes it
        r.lock.acquire()
    r.p = prepare(r.cfg)
    rundir.make_dir(r.out)
    r.lock.acquire()
    log(f"run directory: {r.out}")
    r.store = fileio.RowStore(r.out / "rows.jsonl")
    r.done = resume_rows(r.out, r.store, r.p, r.cfg)
    fileio.atomic_write_text(r.out / "config.yaml", dump_config(r.cfg))
    write_json(r.out / "manifest.json", {**r.p.manifest, "config_name": config_name})
    write_json(r.out / STATE, {"rows_key": r.p.rows_key, "census_key": r.p.census_key, "inputs": r.p.inputs})
    if r.cfg.census.enabled and not (r.out / "census.json").exists():
        _census(r.cfg, r.p, r.out)
    if drop_model:  # the cells run in workers: this process keeps no copy of the weights
        r.p.lm = None


def _add_mixed(r: _Run) -> None:
    """Search the config's mixed recipes on this run's sensitivities and add them to its recipes; rows
    of the same mixed recipe and inputs already in rows.jsonl are kept (resume)."""
    from ..mixed.stage import build_mixed

    census = fileio.read_json_or_none(r.out / "census.json")
    with onloaded(r.p.lm.model):  # the sensitivity pass reads the weights (offloaded ones made real for it)
        extra = build_mixed(r.p.lm.model, r.cfg, r.p.calib, r.p.windows.input_ids[:2, :256], census, r.done, r.out)
    # the searched recipes become plain recipes (a worker re-validates this config: no `mixed:` left to re-search)
    r.cfg = r.cfg.model_copy(update={"recipes": (*r.cfg.recipes, *extra), "mixed": ()})
    keys = {x.name: recipe_key(x) for x in extra}
    r.done.update({k: v for k, v in fileio.latest_by_recipe(r.store.load()).items()
                   if k in keys and v.get("status") == "ok" and v.get("recipe_key") == keys[k]
                   and v.get("inputs_key") == r.p.rows_key})


def _finish(r: _Run) -> None:
    """Tables, report and the export list of one run directory."""
    rows = [r.done[x.name] for x in r.cfg.recipes if x.name in r.done]
    df = to_frame(rows, {x.name: x for x in r.cfg.recipes})
    write_tables(df, r.out)
    print(markdown(df))
    finish_report(r.out, df, r.cfg)
    if r.cfg.export:  # the `export:` list: write, reload and verify those recipes (quantbench/export)
        from ..export.context import RunContext
        from ..export.job import export_list

        with onloaded(r.p.lm.model):  # export copies and rewrites the weights (offloaded ones made real)
            export_list(RunContext(r.out, r.cfg, r.p.manifest, r.p.lm, r.p.windows, r.p.calib), r.cfg.export)


def _census(cfg: RunConfig, p: Prepared, out: Path) -> None:
    t1 = time.perf_counter()
    with onloaded(p.lm.model):  # weight statistics need offloaded weights real (quantbench/modeling/offload.py)
        census = run_census(p.lm.model, p.census_batches, p.lm.tokenizer, cfg.census, cfg.eval.batch_size)
    write_census(census, out, cfg.census.plots)
    s = census["summary"]
    log(f"census ({time.perf_counter() - t1:.1f}s): max |x| {s['max_abs']:.0f} ({s['max_ratio']:.0f}x median), "
        f"outlier layers {len(s['outlier_layers'])}, dims {s['outlier_dims']}, "
        f"first-token attention {s['mean_first_token_attn'] or 0:.2f}")


def _stopped(cfg: RunConfig, out: Path, done: dict[str, dict]) -> None:
    """Ctrl-C / SIGTERM: the tables for the finished rows, and what was kept."""
    rows = [done[r.name] for r in cfg.recipes if r.name in done]
    if rows:
        write_tables(to_frame(rows, {r.name: r for r in cfg.recipes}), out)
    log(f"stopped: {len(rows)} of {len(cfg.recipes)} recipe(s) finished; their rows are kept in "
        f"{out / 'rows.jsonl'}" + (f" and tabled in {out / 'results.md'}" if rows else ""))


def _sweep_all(ex: Executor, runs: list[_Run], states: dict[int, "CellState"]) -> list[str]:
    """Every (model, recipe) cell not finished yet, on the executor; each row is appended to its run's
    rows.jsonl as it arrives (`done` updated in place). Returns the cells lost with their worker."""
    cells = [Cell(i, x.name, (r.cfg.model_dump(mode="json"), x.name, r.p.inputs))
             for i, r in enumerate(runs) for x in r.cfg.recipes if x.name not in r.done]

    def local(cell: Cell) -> tuple[dict, dict | None]:  # serial: this process's model, loaded once
        if cell.run not in states:
            states[cell.run] = CellState(runs[cell.run].cfg, runs[cell.run].p)
        states[cell.run].cfg = runs[cell.run].cfg  # mixed recipes are added after the first sweep
        return states[cell.run].compute(cell.recipe)

    many = len(runs) > 1
    lost = ex.run(cells, local, worker_cell, lambda cell, res: _record(runs[cell.run], *res, label=many))
    return [f"{_slug(runs[c.run].cfg.model)}/{c.recipe}" for c in lost]


def _record(r: _Run, row: dict, plan: dict | None, label: bool = False) -> None:
    """Append one finished cell's row (and write its plan record): always here, in the driver."""
    recipe = next(x for x in r.cfg.recipes if x.name == row["recipe"])
    row["recipe_key"] = recipe_key(recipe)
    row["inputs_key"] = r.p.rows_key
    r.store.append(row)
    r.done[recipe.name] = row
    if plan is not None:
        rundir.make_dir(r.out / "plans")
        write_json(r.out / "plans" / f"{recipe.name}.json", plan)
    who = f"[{_slug(r.cfg.model)}] " if label else ""
    log(f"{who}{recipe.name}: {row['status']}" + (
        f", ppl {row['ppl']:.3f} ({row['delta_ppl_pct']:+.1f}%), KL {row['kl']:.4f}, top-1 {row['top1']:.3f}"
        if row["status"] == "ok" else ""))


def _slug(model: str) -> str:
    return model.replace("/", "_").replace(".", "_").strip("_")[-40:] or "model"


__all__ = ["run", "run_all", "worker_cell", "run_dir_for", "load_rows", "QuantbenchError"]
