"""The main job: config -> model -> census -> for each recipe: apply -> evaluate -> row -> report.

Rows are appended to rows.jsonl as each recipe finishes, so an interrupted sweep keeps them
and a rerun of the same command (same run directory) resumes where it stopped.
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import __version__
from .census import run_census, write_census
from .config import RunConfig, dump_config
from .data import calibration_batches, eval_windows, load_corpus
from .errors import QuantbenchError
from .eval.suite import EvalSuite
from .manifest import build_manifest
from .models import load_model
from .arch import arch_or_none
from .census.quick import outlier_note
from .log import log
from .quant.apply import mitigate, prepare, quantize
from .quant.calibration import Calibration
from .quant.effects import Effects
from .quant.plugin import BackendUnavailable, QuantContext
from .quant.size import measure_size
from .report import finish_report
from .report.tables import markdown, to_frame, write_tables


def run_dir_for(cfg: RunConfig, config_name: str = "run") -> Path:
    slug = cfg.model.replace("/", "_").replace(".", "_").strip("_")[-40:] or "model"
    run_id = cfg.run_id or f"{config_name}-{slug}-{cfg.fingerprint()}"
    return Path(cfg.output_dir) / run_id


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.replace(path)


def load_rows(path: Path) -> dict[str, dict]:
    rows: dict[str, dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by an interruption
            rows[r["recipe"]] = r
    return rows


def _append_row(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row, default=str) + "\n")
        f.flush()


def _recipe_key(recipe) -> str:
    return json.dumps(recipe.model_dump(mode="json"), sort_keys=True)


def run(cfg: RunConfig, config_name: str = "run") -> Path:
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = run_dir_for(cfg, config_name)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(dump_config(cfg))
    log(f"run directory: {out}")

    t0 = time.perf_counter()
    lm = load_model(cfg.model, cfg.device, cfg.dtype)
    model, tok, device = lm.model, lm.tokenizer, next(lm.model.parameters()).device
    log(f"model: {lm.info['source']} ({lm.info['n_params'] / 1e6:.1f}M params, {lm.info['dtype']}, {device}) "
        f"loaded in {time.perf_counter() - t0:.1f}s")
    if lm.info.get("caveat"):
        log(f"note: {lm.info['caveat']}")
    for r in cfg.recipes:  # every recipe checked before any work
        prepare(model, r)
    n_params = sum(p.numel() for p in model.parameters())

    corpus = load_corpus(cfg.corpus.name)
    e = cfg.eval
    windows = eval_windows(tok, corpus.eval_text, e.seq_len, e.effective_stride, e.max_windows, e.bos)
    calib_ids = calibration_batches(tok, corpus.calib_text, cfg.corpus.calib_samples, cfg.corpus.calib_seq_len, cfg.seed)
    calib = Calibration(calib_ids, e.batch_size, device, base_key=lm.info["fingerprint"])
    protocol = {**windows.protocol, "perplexity": "exp(mean token NLL over scored positions)",
                "kl": "mean KL(P_fp || P_q) over scored positions, nats", "calibration": {
                    "split": "calib", "samples": len(calib_ids), "seq_len": calib_ids.shape[1], "seed": cfg.seed}}
    suite = EvalSuite.prepare(cfg, tok, windows, device)
    protocol.update(suite.protocol())
    corpus_info = {"name": corpus.name, "source": corpus.source, "fingerprint": corpus.fingerprint(),
                   "split": "calibration and evaluation texts are disjoint"}
    _write_json(out / "manifest.json", {**build_manifest(cfg, lm.info, corpus_info, protocol),
                                         "config_name": config_name})

    if cfg.census.enabled and not (out / "census.json").exists():
        c = cfg.census
        t1 = time.perf_counter()
        cb = calibration_batches(tok, corpus.eval_text, c.samples, c.seq_len, cfg.seed)
        census = run_census(model, cb, tok, c, e.batch_size)
        write_census(census, out, c.plots)
        s = census["summary"]
        log(f"census ({time.perf_counter() - t1:.1f}s): max |x| {s['max_abs']:.0f} ({s['max_ratio']:.0f}x median), "
            f"outlier layers {len(s['outlier_layers'])}, dims {s['outlier_dims']}, "
            f"first-token attention {s['mean_first_token_attn'] or 0:.2f}")

    rows_path = out / "rows.jsonl"
    done = {k: v for k, v in load_rows(rows_path).items() if v.get("status") == "ok"}
    keys = {r.name: _recipe_key(r) for r in cfg.recipes}
    done = {k: v for k, v in done.items() if k in keys and v.get("recipe_key") == keys[k]}
    if done:
        log(f"resuming: {len(done)} finished row(s) kept ({', '.join(done)})")
    ref, fp_ppl, fp_eval = None, None, None
    fp_notes: dict = {}  # the FP model's outlier note, computed once for the rows of mitigated recipes
    for recipe in cfg.recipes:
        if recipe.name in done:
            continue
        if ref is None:
            log("FP reference: evaluating the unquantized model once")
            fp_eval, fp_extra = suite.reference(model)
            ref = suite.reference_logp
            fp_ppl = fp_eval.ppl
            log(f"FP perplexity {fp_ppl:.3f} over {fp_eval.n_tokens} tokens ({fp_eval.tok_per_s:.0f} tok/s)")
            if e.expected_fp_ppl and abs(fp_ppl / e.expected_fp_ppl - 1) > 0.10:
                log(f"warning: FP perplexity {fp_ppl:.2f} differs from the expected {e.expected_fp_ppl} by more than 10%")
        if recipe.is_fp:  # the reference pass already measured it
            size = measure_size(model, prepare(model, recipe), Effects(), n_params)
            row = {"recipe": recipe.name, "status": "ok", "mode": "fp", "bits_per_weight": size.bits_per_weight,
                   "size_mb": round(size.mb, 2), "ppl": fp_eval.ppl, "delta_ppl_pct": 0.0, "kl": 0.0,
                   "top1": 1.0, "eval_tok_s": round(fp_eval.tok_per_s, 1), "calib_s": 0.0,
                   "wall_s": round(fp_eval.seconds, 2), "n_tokens": fp_eval.n_tokens, "mitigations": "none",
                   "weight_bytes": size.bytes, **fp_extra}
        else:
            row = _run_recipe(model, recipe, RecipeEnv(calib, suite, fp_ppl, n_params, out, fp_notes))
        row["recipe_key"] = keys[recipe.name]
        _append_row(rows_path, row)
        done[recipe.name] = row
        log(f"{recipe.name}: {row['status']}" + (f", ppl {row['ppl']:.3f} ({row['delta_ppl_pct']:+.1f}%), "
                                                  f"KL {row['kl']:.4f}, top-1 {row['top1']:.3f}" if row["status"] == "ok" else ""))
    rows = [done[r.name] for r in cfg.recipes if r.name in done]
    df = to_frame(rows)
    write_tables(df, out)
    print(markdown(df))
    finish_report(out, df, cfg)
    log(f"results: {out / 'results.md'}")
    if cfg.export:  # the `export:` list: write, reload and verify those recipes (quantbench/export)
        from .export.job import export_after_run

        export_after_run(out, cfg)
    return out


@dataclass
class RecipeEnv:
    """What every recipe's row shares: calibration (cached statistics), the evaluation suite, the FP
    reference perplexity, the FP parameter count, the run directory, the FP outlier note."""

    calib: Calibration
    suite: EvalSuite
    fp_ppl: float
    n_params: int
    out: Path
    fp_notes: dict


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
    row = {"recipe": recipe.name, "mode": recipe.backend, "w_bits": recipe.weights.bits if recipe.weights else None,
           "a_bits": recipe.activations.bits if recipe.activations else None,
           "mitigations": "+".join(m.name for m in recipe.mitigations) or "none", "quantbench": __version__}
    t0, ledger0 = time.perf_counter(), len(env.calib.ledger)
    try:
        qmodel = copy.deepcopy(model)
        plan = prepare(qmodel, recipe)
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
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    plans = env.out / "plans"
    plans.mkdir(exist_ok=True)
    _write_json(plans / f"{recipe.name}.json", {**plan.to_json(), "bits": {
        "total": size.total_bits, "per_linear": {k: round(v) for k, v in size.per_linear.items()}}})
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
    lm = load_model(model_spec, cfg.device, cfg.dtype)
    corpus = load_corpus(corpus_name)
    c = cfg.census
    batches = calibration_batches(lm.tokenizer, corpus.eval_text, c.samples, c.seq_len, cfg.seed)
    census = run_census(lm.model, batches, lm.tokenizer, c, cfg.eval.batch_size)
    out.mkdir(parents=True, exist_ok=True)
    write_census(census, out, c.plots)
    s = census["summary"]
    log(f"census ({census['seconds']:.1f}s): max |x| {s['max_abs']:.0f} ({s['max_ratio']:.0f}x median), "
        f"outlier dims {s['outlier_dims']}, first-token attention {s['mean_first_token_attn'] or 0:.2f}, "
        f"pre-quantized weights: {'yes' if s['prequantized'] else 'no'}")
    return out / "census.json"


__all__ = ["run", "profile", "run_dir_for", "load_rows", "QuantbenchError"]
