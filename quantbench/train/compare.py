"""Per-variant census + quantization sweep (through quantbench.run.pipeline.run) and the comparison:
convergence, held-out perplexity, outlier statistics and Δperplexity per recipe, side by side."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import torch

from ..run.config import parse_config
from .config import TrainConfig
from .data import BB_CORPUS, bb_data
from .loop import TrainLog, log

BASELINE = "softmax"
BB_PROBE = "bb_probe.json"  # Bigram-Backcopy runs: the probe of quantbench/train/bb_probe.py, next to census.json


def sweep_config(cfg: TrainConfig, variant: str, final: Path, root: Path) -> dict:
    """The RunConfig (as a dict) that censuses and sweeps one trained checkpoint."""
    s = cfg.sweep
    corpus = str(root.parent / BB_CORPUS) if cfg.data.synthetic else cfg.data.corpus  # BB: written by train_all
    return {"run_id": variant, "output_dir": str(root), "seed": cfg.seed, "model": str(final),
            "device": cfg.device, "dtype": "float32", "threads": cfg.threads,
            "corpus": {"name": corpus, "calib_samples": s.calib_samples,
                       "calib_seq_len": cfg.model.context},
            "eval": {"seq_len": s.eval_seq_len, "max_windows": s.eval_windows, "batch_size": s.batch_size},
            "census": {"enabled": False},  # run below by run_census, written next to the sweep rows
            "recipes": list(s.recipes)}


def run_variant_census(cfg: TrainConfig, final: Path, dest: Path) -> dict:
    """quantbench.census.run_census on census_samples random context-length windows of the evaluation text
    (Bigram-Backcopy: the first census_samples held-out sequences)."""
    from ..census import run_census
    from ..data.corpus import calibration_batches, load_corpus
    from ..modeling.load import load_model
    from ..run.config import CensusConfig

    if dest.exists():
        old = json.loads(dest.read_text())
        if (old.get("sequences"), old.get("seq_len")) == (cfg.sweep.census_samples, cfg.model.context):
            return old
    lm = load_model(str(final), cfg.device, "float32")
    if cfg.data.synthetic:
        batches = bb_data(cfg.data, cfg.model.context).heldout_windows(cfg.sweep.census_samples, cfg.model.context)
    else:
        corpus = load_corpus(cfg.data.corpus)
        batches = calibration_batches(lm.tokenizer, corpus.eval_text, cfg.sweep.census_samples, cfg.model.context,
                                      cfg.seed)
    ccfg = CensusConfig(samples=cfg.sweep.census_samples, seq_len=cfg.model.context)
    census = run_census(lm.model, batches, tokenizer=lm.tokenizer, cfg=ccfg, batch_size=cfg.sweep.batch_size)
    if lm.model.config.attention == "kv_bias":
        census["bias_slot_mass_by_layer"] = bias_slot_mass(lm.model, batches)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(census, indent=1, default=str))
    s = census["summary"]
    log(f"census: max |x| {s['max_abs']:.2f} ({s['max_ratio']:.1f}x median), "
        f"first-token attention {s['mean_first_token_attn'] or 0:.3f}")
    return census


@torch.no_grad()
def bias_slot_mass(model, batches: torch.Tensor) -> list[float]:
    """kv_bias only: mean attention mass on the learned bias slot, per layer (eager forward)."""
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        model(input_ids=batches.to(next(model.parameters()).device))
        return [layer.self_attn.last_bias_mass for layer in model.model.layers]
    finally:
        model.set_attn_implementation(before)


def run_sweep(cfg: TrainConfig, variant: str, final: Path, root: Path) -> Path:
    """Census (census.json) and the quantization sweep (rows.jsonl) of one checkpoint under root/variant."""
    from ..run.pipeline import run as run_pipeline

    out = run_pipeline(parse_config(sweep_config(cfg, variant, final, root)), config_name=variant)
    run_variant_census(cfg, final, out / "census.json")
    if cfg.data.synthetic:
        run_bb_probe(cfg, final, out / BB_PROBE)
    return out


def run_bb_probe(cfg: TrainConfig, final: Path, dest: Path) -> dict:
    """Bigram-Backcopy only: quantbench.train.bb_probe on every held-out sequence (bb_probe.json)."""
    from ..modeling.load import load_model
    from .bb_probe import bb_probe

    data = bb_data(cfg.data, cfg.model.context)
    lm = load_model(str(final), cfg.device, "float32")
    probe = bb_probe(lm.model, data.heldout, data.task)
    dest.write_text(json.dumps(probe, indent=1))
    s = probe["summary"]
    log(f"bb probe: BOS attention (non-trigger queries) {s['max_bos_attn_other']:.3f} in layer "
        f"{s['max_bos_attn_other_layer']}, BOS residual norm {s['max_bos_norm_ratio']:.1f}x median")
    return probe


def steps_to_reach(curve: list[list[float]], target: float) -> float | None:
    """First step at which a [step, tokens, loss] curve reaches `target`, linearly interpolated
    between evaluation points (None if it never does)."""
    prev = None
    for step, _tok, loss in curve:
        if loss <= target:
            if prev is None or prev[1] == loss:
                return float(step)
            (s0, l0), s1 = prev, step
            return s0 + (s1 - s0) * (l0 - target) / (l0 - loss)
        prev = (step, loss)
    return None


def default_targets(ref: TrainLog) -> list[float]:
    """The reference's held-out loss at 1/4, 1/2 and the end of training."""
    h = ref.heldout
    picks = [h[max(0, len(h) // 4 - 1)], h[max(0, len(h) // 2 - 1)], h[-1]]
    return sorted({math.ceil(p[2] * 1000) / 1000 for p in picks}, reverse=True)  # rounded up: the reference reaches it


def _census_part(census: dict | None) -> dict:
    if not census:
        return {}
    s = census.get("summary", {})
    wr = s.get("max_weight_ratio")
    layers = [{k: r.get(k) for k in ("layer", "max_abs", "median_abs", "ratio", "kurtosis", "first_token_attn", "token")}
              for r in census.get("layers", [])]
    return {"max_abs": s.get("max_abs"), "max_ratio": s.get("max_ratio"),
            "outlier_layers": s.get("outlier_layers"), "first_token_attn": s.get("mean_first_token_attn"),
            "max_weight_ratio": wr.get("max_over_mean") if isinstance(wr, dict) else wr,
            "max_kurtosis": max((r["kurtosis"] for r in layers if r.get("kurtosis") is not None), default=None),
            "bias_slot_mass": _mean(census.get("bias_slot_mass_by_layer")), "thresholds": census.get("thresholds"),
            "layers": layers}


def _mean(xs: list[float] | None) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _sweep_part(rows: dict[str, dict]) -> dict:
    fp = rows.get("fp", {})
    return {"fp_ppl": fp.get("ppl"),
            "recipes": {k: {"ppl": r.get("ppl"), "delta_ppl_pct": r.get("delta_ppl_pct"),
                            "delta_ppl_lo": r.get("delta_ppl_lo"), "delta_ppl_hi": r.get("delta_ppl_hi"),
                            "kl": r.get("kl"), "status": r.get("status")} for k, r in rows.items() if k != "fp"}}


def variant_summary(variant: str, tlog: TrainLog, census: dict | None, rows: dict[str, dict],
                    bb: dict | None = None) -> dict:
    last = tlog.train[-10:]
    held = tlog.heldout[-1][2]
    out = {"variant": variant, "n_params": tlog.n_params, "steps": int(tlog.train[-1][0]),
           "tokens": int(tlog.train[-1][1]), "train_seconds": round(tlog.seconds, 1),
           "final_train_loss": sum(r[2] for r in last) / len(last), "final_heldout_loss": held,
           "heldout_ppl": math.exp(held), "curves": {"train": tlog.train, "heldout": tlog.heldout},
           "census": _census_part(census), "sweep": _sweep_part(rows)}
    if bb is not None:
        out["bb"] = bb
    return out


def add_convergence(summaries: list[dict], logs: dict[str, TrainLog], targets: list[float], ref: str) -> None:
    """Steps/tokens to each target loss and the speed-up vs the reference (ref steps / variant steps)."""
    tok_per_step = {v: (lg.train[-1][1] / lg.train[-1][0]) for v, lg in logs.items()}
    ref_steps = {t: steps_to_reach(logs[ref].heldout, t) for t in targets}
    for s in summaries:
        conv = []
        for t in targets:
            st = steps_to_reach(logs[s["variant"]].heldout, t)
            speed = ref_steps[t] / st if st and ref_steps[t] else None
            conv.append({"target": t, "steps": st, "tokens": st * tok_per_step[s["variant"]] if st else None,
                         "speedup": speed})
        s["convergence"] = conv


def load_sweep(sweep_dir: Path) -> tuple[dict | None, dict[str, dict]]:
    from ..run.pipeline import load_rows

    cpath = sweep_dir / "census.json"
    census = json.loads(cpath.read_text()) if cpath.exists() else None
    rows = {k: r for k, r in load_rows(sweep_dir / "rows.jsonl").items() if r.get("status") == "ok"}
    table = sweep_dir / "results.csv"  # the paired 95% Δppl intervals are computed for the tables, not stored in rows
    if table.exists():
        with open(table, newline="") as f:
            for t in csv.DictReader(f):
                if t.get("recipe") in rows:
                    for k in ("delta_ppl_lo", "delta_ppl_hi"):
                        rows[t["recipe"]][k] = _float(t.get(k))
    return census, rows


def _float(x: str | None) -> float | None:
    try:
        v = float(x) if x not in (None, "") else None
    except ValueError:
        return None
    return v if v is not None and math.isfinite(v) else None


def load_bb_probe(sweep_dir: Path) -> dict | None:
    p = sweep_dir / BB_PROBE
    return json.loads(p.read_text()) if p.exists() else None
