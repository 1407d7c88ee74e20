"""The main job: config -> model -> census -> for each recipe: apply -> evaluate -> row -> report.

Rows are appended to rows.jsonl as each recipe finishes, so an interrupted sweep keeps them
and a rerun of the same command (same run directory) resumes where it stopped.
"""
from __future__ import annotations

import copy
import json
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import __version__
from ..core import fileio
from . import rundir
from ..census import run_census, write_census
from .config import RunConfig, dump_config, validate
from ..data.corpus import Windows, calibration_batches, eval_windows, load_corpus
from ..core.errors import ConfigError, QuantbenchError
from ..eval.suite import EvalSuite
from .executor import Cell, Executor, make_executor
from .manifest import build_manifest, changed_inputs, inputs_key, run_inputs
from ..modeling.load import LoadedModel, load_model
from ..modeling.arch import arch_or_none
from ..census.quick import outlier_note
from ..core.log import log
from ..modeling.offload import onload, onloaded
from ..modeling.memory import return_freed_memory
from ..modeling.pristine import Pristine
from ..quant.apply import mitigate, quantize
from ..quant.apply import prepare as plan_recipe
from ..quant.calibration import Calibration
from ..quant.effects import Effects
from ..quant.plugin import BackendUnavailable, QuantContext
from ..quant.sequential import sequential_input_stats
from ..quant.size import measure_size
from ..modeling.surgery import model_device
from ..report import finish_report
from ..report.tables import markdown, to_frame, write_tables


def run_dir_for(cfg: RunConfig, config_name: str = "run") -> Path:
    run_id = cfg.run_id or f"{config_name}-{_slug(cfg.model)}-{cfg.fingerprint()}"
    return Path(cfg.output_dir) / run_id


def _write_json(path: Path, obj) -> None:
    fileio.atomic_write_json(path, obj)


def load_rows(path: Path) -> dict[str, dict]:
    """The last row of each recipe in a rows.jsonl (read only; a cut last line is ignored)."""
    return fileio.latest_by_recipe(fileio.read_rows(path))


def _recipe_key(recipe) -> str:
    return json.dumps(recipe.model_dump(mode="json"), sort_keys=True)


@dataclass
class Prepared:
    """What a run needs, built and checked before the run directory is created."""

    lm: LoadedModel
    windows: Windows
    calib: Calibration
    census_batches: torch.Tensor | None
    suite: EvalSuite
    manifest: dict
    inputs: dict
    rows_key: str
    census_key: str


def prepare(cfg: RunConfig) -> Prepared:
    """Load and check everything a bad input could break (config paths, model, corpus lengths,
    recipes, tasks) -- before anything is written, so a failed run leaves no directory behind."""
    inc = cfg.tasks.include_path
    if inc and not Path(inc).expanduser().is_dir():
        raise ConfigError(f"config: tasks.include_path: no such folder: {inc}")
    corpus = load_corpus(cfg.corpus.name)  # cheap checks first: a bad corpus fails before the model loads
    t0 = time.perf_counter()
    lm = load_model(cfg.model, cfg.device, cfg.dtype, placement=cfg.placement.load_kwargs())
    model, tok, device = lm.model, lm.tokenizer, model_device(lm.model)  # not meta when the embedding is offloaded
    log(f"model: {lm.info['source']} ({lm.info['n_params'] / 1e6:.1f}M params, {lm.info['dtype']}, {device}) "
        f"loaded in {time.perf_counter() - t0:.1f}s")
    if lm.info.get("caveat"):
        log(f"note: {lm.info['caveat']}")
    with onloaded(model):  # the checks trace the model (offloaded weights made real for it)
        for r in cfg.recipes:  # every recipe checked before any work
            plan_recipe(model, r)

    e, c = cfg.eval, cfg.census
    windows = eval_windows(tok, corpus.eval_text, e.seq_len, e.effective_stride, e.max_windows, e.bos)
    calib_ids = calibration_batches(tok, corpus.calib_text, cfg.corpus.calib_samples, cfg.corpus.calib_seq_len, cfg.seed)
    calib = Calibration(calib_ids, e.batch_size, device, base_key=lm.info["fingerprint"],
                        collect=sequential_input_stats if cfg.calibration.mode == "sequential" else None)
    cb = calibration_batches(tok, corpus.eval_text, c.samples, c.seq_len, cfg.seed,
                             setting="census.seq_len", what="census") if c.enabled else None
    protocol = {**windows.protocol, "perplexity": "exp(mean token NLL over scored positions)",
                "kl": "mean KL(P_fp || P_q) over scored positions, nats", "calibration": {
                    "split": "calib", "samples": len(calib_ids), "seq_len": calib_ids.shape[1], "seed": cfg.seed}}
    suite = EvalSuite.prepare(cfg, tok, windows, device)
    protocol.update(suite.protocol())
    corpus_info = {"name": corpus.name, "source": corpus.source, "fingerprint": corpus.fingerprint(),
                   "split": corpus.split}
    inputs = run_inputs(cfg, lm.info, corpus.fingerprint())
    rows_key = inputs_key(inputs)
    census_key = inputs_key(inputs, cfg.census.model_dump(mode="json"))
    manifest = {**build_manifest(cfg, lm.info, corpus_info, protocol), "inputs_key": rows_key}
    return Prepared(lm, windows, calib, cb, suite, manifest, inputs, rows_key, census_key)


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
    r.done = _resume(r.out, r.store, r.p, r.cfg)
    fileio.atomic_write_text(r.out / "config.yaml", dump_config(r.cfg))
    _write_json(r.out / "manifest.json", {**r.p.manifest, "config_name": config_name})
    _write_json(r.out / STATE, {"rows_key": r.p.rows_key, "census_key": r.p.census_key, "inputs": r.p.inputs})
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
    keys = {x.name: _recipe_key(x) for x in extra}
    r.done.update({k: v for k, v in fileio.latest_by_recipe(r.store.load()).items()
                   if k in keys and v.get("status") == "ok" and v.get("recipe_key") == keys[k]
                   and v.get("inputs_key") == r.p.rows_key})


def _finish(r: _Run) -> None:
    """Tables, report and the export list of one run directory."""
    rows = [r.done[x.name] for x in r.cfg.recipes if x.name in r.done]
    df = to_frame(rows)
    write_tables(df, r.out)
    print(markdown(df))
    finish_report(r.out, df, r.cfg)
    if r.cfg.export:  # the `export:` list: write, reload and verify those recipes (quantbench/export)
        from ..export.context import RunContext
        from ..export.job import export_list

        with onloaded(r.p.lm.model):  # export copies and rewrites the weights (offloaded ones made real)
            export_list(RunContext(r.out, r.cfg, r.p.manifest, r.p.lm, r.p.windows, r.p.calib), r.cfg.export)


STATE = "inputs.json"  # the keys of what the rows and the census in this directory were computed from
CENSUS_FILES = ("census.json", "census.md")
TABLE_FILES = ("results.csv", "results.md", "layers.csv", "recommendation.txt", "report.html")


def _resume(out: Path, store: fileio.RowStore, p: Prepared, cfg: RunConfig) -> dict[str, dict]:
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
    keys = {r.name: _recipe_key(r) for r in cfg.recipes}  # a changed recipe is recomputed
    done = {k: v for k, v in fileio.latest_by_recipe(keep).items()
            if v.get("status") == "ok" and v.get("recipe_key") == keys.get(k)}
    if done:
        log(f"resuming: {len(done)} finished row(s) kept ({', '.join(done)})")
    return done


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
        write_tables(to_frame(rows), out)
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
    row["recipe_key"] = _recipe_key(recipe)
    row["inputs_key"] = r.p.rows_key
    r.store.append(row)
    r.done[recipe.name] = row
    if plan is not None:
        rundir.make_dir(r.out / "plans")
        _write_json(r.out / "plans" / f"{recipe.name}.json", plan)
    who = f"[{_slug(r.cfg.model)}] " if label else ""
    log(f"{who}{recipe.name}: {row['status']}" + (
        f", ppl {row['ppl']:.3f} ({row['delta_ppl_pct']:+.1f}%), KL {row['kl']:.4f}, top-1 {row['top1']:.3f}"
        if row["status"] == "ok" else ""))


class CellState:
    """What the cells of one checkpoint share in one process: the prepared inputs (model,
    calibration with its statistics cache, evaluation suite), the FP reference (evaluated on the
    first cell, once per process) and the FP outlier notes."""

    def __init__(self, cfg: RunConfig, p: Prepared) -> None:
        self.cfg, self.p = cfg, p
        self.n_params = sum(t.numel() for t in p.lm.model.parameters())
        self.fp_eval, self.fp_extra = None, {}
        self.fp_notes: dict = {}
        self.pristine: Pristine | None = None  # the loaded model's state, captured before the first quantized recipe

    def _reference(self) -> None:
        if self.fp_eval is not None:
            return
        log("FP reference: evaluating the unquantized model once")
        self.fp_eval, self.fp_extra = self.p.suite.reference(self.p.lm.model)
        fp, e = self.fp_eval, self.cfg.eval
        log(f"FP perplexity {fp.ppl:.3f} over {fp.n_tokens} tokens ({fp.tok_per_s:.0f} tok/s)")
        if e.expected_fp_ppl and abs(fp.ppl / e.expected_fp_ppl - 1) > 0.10:
            log(f"warning: FP perplexity {fp.ppl:.2f} differs from the expected {e.expected_fp_ppl} by more than 10%")

    def compute(self, name: str) -> tuple[dict, dict | None]:
        """One recipe's row and its plan record (None for FP and skipped recipes)."""
        recipe = next(x for x in self.cfg.recipes if x.name == name)
        self._reference()
        model, fp_eval = self.p.lm.model, self.fp_eval
        if recipe.is_fp:  # the reference pass already measured it
            size = measure_size(model, plan_recipe(model, recipe), Effects(), self.n_params)
            return {"recipe": recipe.name, "status": "ok", "mode": "fp", "bits_per_weight": size.bits_per_weight,
                    "size_mb": round(size.mb, 2), "ppl": fp_eval.ppl, "delta_ppl_pct": 0.0, "kl": 0.0,
                    "top1": 1.0, "eval_tok_s": round(fp_eval.tok_per_s, 1), "calib_s": 0.0,
                    "wall_s": round(fp_eval.seconds, 2), "n_tokens": fp_eval.n_tokens, "mitigations": "none",
                    "weight_bytes": size.bytes, **self.fp_extra}, None
        if self.pristine is None:
            self.pristine = capture_pristine(self.p.lm)
        env = RecipeEnv(self.p.calib, self.p.suite, fp_eval.ppl, self.n_params, {}, self.fp_notes, self.pristine)
        row = _run_recipe(model, recipe, env)
        return row, env.plans.get(recipe.name)


_WORKER: dict[str, CellState] = {}  # a worker process's state: one checkpoint at a time, kept across tasks


def worker_cell(cfg_json: dict, recipe: str, inputs: dict) -> tuple[dict, dict | None]:
    """One (model, recipe) cell in a worker process (the Ray task body). The first cell of a
    checkpoint in this process rebuilds its shared state (load, calibration batches, evaluation
    suite; the FP reference on first use); later cells reuse it. The inputs must equal the driver's."""
    cfg = validate(RunConfig, cfg_json)
    key = cfg.fingerprint()  # everything that changes results (not the output folder)
    if key not in _WORKER:
        _WORKER.clear()  # one checkpoint's weights per worker
        return_freed_memory()  # freed tensors go back to the system (quantbench/modeling/memory.py)
        torch.manual_seed(cfg.seed)
        torch.set_num_threads(cfg.threads or max(1, int(cfg.executor.num_cpus)))
        p = prepare(cfg)
        if p.rows_key != inputs_key(inputs):
            what = ", ".join(changed_inputs(inputs, p.inputs)[:4]) or "unknown inputs"
            raise QuantbenchError(f"worker on {socket.gethostname()}: the inputs of {cfg.model} differ from the "
                                  f"driver's ({what}); give every node the same files, packages and device kind")
        _WORKER[key] = CellState(cfg, p)
    return _WORKER[key].compute(recipe)


def _slug(model: str) -> str:
    return model.replace("/", "_").replace(".", "_").strip("_")[-40:] or "model"


@dataclass
class RecipeEnv:
    """What every recipe's row shares: calibration (cached statistics), the evaluation suite, the FP
    reference perplexity, the FP parameter count, the plan records, the FP outlier note."""

    calib: Calibration
    suite: EvalSuite
    fp_ppl: float
    n_params: int
    plans: dict  # recipe name -> its plan record (plans/<name>.json, written by the driver)
    fp_notes: dict
    pristine: Pristine | None = None  # None: each recipe works on a deep copy of the model


def capture_pristine(lm: LoadedModel) -> Pristine | None:
    """The loaded model's state, kept once: recipes quantize the model in place and it is restored after
    each (quantbench/modeling/pristine.py); values stored in the model's safetensors files are read back from them."""
    t0 = time.perf_counter()
    pr = Pristine(lm.model, lm.folder)
    log(f"pristine state kept ({pr.file_bytes / 2**20:.0f} MB read back from the model files, "
        f"{pr.clone_bytes / 2**20:.0f} MB cloned) in {time.perf_counter() - t0:.1f}s")
    return pr


def _outliers(model, env: RecipeEnv, plan, key: str) -> dict:
    """The outlier note of `model` (mitigated FP) as row columns `<name>_<key>` (before: cached)."""
    ids, mods = env.calib.batches[:2, :128], {n: model.get_submodule(n) for n in plan.linears}
    if key == "before":
        names = tuple(plan.linears)
        if names not in env.fp_notes:
            env.fp_notes[names] = outlier_note(model, ids, mods, env.calib.batch_size)
        note = env.fp_notes[names]
    else:
        note = outlier_note(model, ids, mods, env.calib.batch_size)
    return {f"{k}_{key}": v for k, v in note.items()}


def _run_recipe(model, recipe, env: RecipeEnv) -> dict:
    """One recipe's row. With env.pristine the recipe is applied to `model` itself and the model is
    restored afterwards (even on error); without, to a deep copy (the reference path of the tests)."""
    row = {"recipe": recipe.name, "mode": recipe.backend, "w_bits": recipe.weights.bits if recipe.weights else None,
           "a_bits": recipe.activations.bits if recipe.activations else None,
           "mitigations": "+".join(m.name for m in recipe.mitigations) or "none", "quantbench": __version__}
    t0, ledger0 = time.perf_counter(), len(env.calib.ledger)
    try:
        qmodel = model if env.pristine is not None else copy.deepcopy(model)
        if env.pristine is not None:
            onload(qmodel)  # offloaded modules (device_map 'disk') made real for the recipe; restore() undoes it
        plan = plan_recipe(qmodel, recipe)
        ctx = QuantContext(plan=plan, calib=env.calib, arch=arch_or_none(qmodel))
        notes: dict = {}
        if recipe.mitigations:
            notes.update(_outliers(qmodel, env, plan, "before"))
            t1 = time.perf_counter()
            mitigate(qmodel, ctx)
            t_mit = time.perf_counter() - t1
            notes.update(_outliers(qmodel, env, plan, "after"))
            census_s = time.perf_counter() - t0 - t_mit
        else:
            census_s = 0.0
        qmodel = quantize(qmodel, ctx)
        size = measure_size(qmodel, plan, ctx.effects, env.n_params)
        calib_s = time.perf_counter() - t0 - census_s  # the census of the mitigated model is not calibration
        spent, reused = env.calib.seconds(ledger0)
        res, extra = env.suite.score(qmodel, ctx.effects)
    except BackendUnavailable as err:
        return {**row, "status": f"skipped: {err}", "wall_s": round(time.perf_counter() - t0, 2)}
    finally:
        if env.pristine is not None:
            env.pristine.restore()  # the next recipe starts from the loaded model again
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    env.plans[recipe.name] = {**plan.to_json(), "bits": {
        "total": size.total_bits, "per_linear": {k: round(v) for k, v in size.per_linear.items()}}}
    row.update(status="ok", mode=plan.mode, bits_per_weight=round(size.bits_per_weight, 3),
               size_mb=round(size.mb, 2), weight_bytes=size.bytes, ppl=res.ppl,
               delta_ppl_pct=100 * (res.ppl / env.fp_ppl - 1), kl=res.kl, top1=res.top1,
               eval_tok_s=round(res.tok_per_s, 1), calib_s=round(calib_s, 2), calib_stats_s=round(spent, 2),
               calib_stats_reused=reused, census_s=round(census_s, 2),
               wall_s=round(time.perf_counter() - t0, 2), n_tokens=res.n_tokens,
               **ctx.effects.notes, **notes, **extra)
    return row


def profile(model_spec: str, corpus_name: str, out: Path, cfg: RunConfig) -> Path:
    """The census alone (the `profile` command)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rundir.check_output_dir(out)
    lm = load_model(model_spec, cfg.device, cfg.dtype)
    corpus = load_corpus(corpus_name)
    c = cfg.census
    batches = calibration_batches(lm.tokenizer, corpus.eval_text, c.samples, c.seq_len, cfg.seed,
                                  setting="census.seq_len", what="census")
    census = run_census(lm.model, batches, lm.tokenizer, c, cfg.eval.batch_size)
    rundir.make_dir(out)
    write_census(census, out, c.plots)
    s = census["summary"]
    log(f"census ({census['seconds']:.1f}s): max |x| {s['max_abs']:.0f} ({s['max_ratio']:.0f}x median), "
        f"outlier dims {s['outlier_dims']}, first-token attention {s['mean_first_token_attn'] or 0:.2f}, "
        f"pre-quantized weights: {'yes' if s['prequantized'] else 'no'}")
    return out / "census.json"


__all__ = ["run", "run_all", "worker_cell", "profile", "run_dir_for", "load_rows", "QuantbenchError"]
