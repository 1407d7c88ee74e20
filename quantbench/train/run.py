"""`quantbench train`: train every attention variant with the same data/seed/budget, census and sweep
each final checkpoint, and write one comparison. Rerunning the same command resumes: finished
variants are skipped, an interrupted one continues from its last checkpoint, finished sweep rows
are kept."""
from __future__ import annotations

import json
import platform

import torch

from .. import __version__
from ..modeling.load import resolve_device
from .compare import (BASELINE, add_convergence, default_targets, load_bb_probe, load_sweep, run_sweep,
                      variant_summary)
from .config import TrainConfig
from .data import BB_CORPUS, bb_data, bb_tokenizer, load_tokenizer, load_tokens, write_bb_corpus
from .loop import Trainer, TrainLog, log
from .report import write_comparison


def _manifest(cfg: TrainConfig, device: torch.device, source: str) -> dict:
    return {"quantbench": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "device": str(device), "config": cfg.model_dump(mode="json"), "data_source": source,
            "fingerprint": cfg.fingerprint()}


def load_data(cfg: TrainConfig, out):
    """(tokenizer, data) of the config's data source. Bigram-Backcopy: its own word-level tokenizer
    (vocab + BOS) and the sweep's corpus file `<run>/bb_corpus.txt` (held-out and calibration sequences)."""
    if cfg.data.synthetic:
        data = bb_data(cfg.data, cfg.model.context)
        write_bb_corpus(data, out / BB_CORPUS, cfg.sweep.eval_seq_len, cfg.model.context, cfg.seed)
        return bb_tokenizer(cfg.data.vocab), data
    tok = load_tokenizer(cfg.data.tokenizer)
    return tok, load_tokens(cfg.data, tok, cfg.model.context, cache=out / "tokens.pt")


def train_all(cfg: TrainConfig, config_name: str = "train", on_step=None) -> dict[str, TrainLog]:
    """Train (or resume, or skip finished) every variant; returns their logs."""
    out = cfg.run_dir(config_name)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    tok, data = load_data(cfg, out)
    (out / "manifest.json").write_text(json.dumps(_manifest(cfg, device, data.source), indent=1))
    if cfg.data.synthetic:
        log(f"run directory: {out} ({data.source}; fresh sequences every step, {len(data.heldout)} held out, {device})")
    else:
        log(f"run directory: {out} ({len(data.train)} training tokens, {len(data.heldout)} held out, {device})")
    logs = {}
    for v in cfg.variants:
        logs[v] = Trainer(cfg, v, data, tok, out / v, device, on_step=on_step).run()
        log(f"{v}: done, held-out loss {logs[v].heldout[-1][2]:.3f} ({logs[v].seconds:.0f}s)")
    return logs


def run_training(cfg: TrainConfig, config_name: str = "train", on_step=None):
    """Train, census + sweep, compare. Returns the path of comparison.md."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = cfg.run_dir(config_name)
    logs = train_all(cfg, config_name, on_step)
    summaries = []
    recipes = [r for r in cfg.sweep.recipes if r != "fp"]
    for v in cfg.variants:
        census, rows, bb = None, {}, None
        if cfg.sweep.enabled:
            log(f"{v}: census and quantization sweep")
            sweep_dir = run_sweep(cfg, v, out / v / "final", out / "sweep")
            census, rows = load_sweep(sweep_dir)
            bb = load_bb_probe(sweep_dir)
        summaries.append(variant_summary(v, logs[v], census, rows, bb))
    ref = BASELINE if BASELINE in logs else cfg.variants[0]
    targets = list(cfg.target_losses) if cfg.target_losses else default_targets(logs[ref])
    add_convergence(summaries, logs, targets, ref)
    path = write_comparison(out, summaries, recipes if cfg.sweep.enabled else [], targets, ref)
    log(f"comparison: {path}")
    return path
