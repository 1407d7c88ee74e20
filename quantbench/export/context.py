"""Rebuild what a run measured with, from its directory: the resolved config.yaml and manifest.json
give the model, the corpus, the evaluation windows and the calibration batches (same seed), and the
fingerprints recorded at run time are checked so the export re-applies the recipe to the same inputs.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.errors import QuantbenchError
from ..core.log import log
from ..core.registry import suggest
from ..data.corpus import Windows, calibration_batches, eval_windows, load_corpus
from ..modeling.load import LoadedModel, load_model
from ..quant.calibration import Calibration
from ..quant.spec import Recipe
from ..run.config import RunConfig, load_config


@dataclass
class RunContext:
    run_dir: Path
    cfg: RunConfig
    manifest: dict
    lm: LoadedModel
    windows: Windows
    calib: Calibration

    @property
    def device(self) -> torch.device:
        return next(self.lm.model.parameters()).device

    def recipe(self, name: str) -> Recipe:
        return run_recipe(self.run_dir, self.cfg, name)


def run_recipe(run_dir: Path, cfg: RunConfig, name: str) -> Recipe:
    """A recipe of the run: one of its config's, or a mixed recipe the run (or `recommend --mixed`)
    searched and kept in <run>/mixed/ with its plan."""
    from ..mixed.stage import saved_recipe, saved_recipes

    by_name = {r.name: r for r in cfg.recipes}
    if name in by_name:
        return by_name[name]
    kept = saved_recipe(run_dir, name)
    if kept is not None:
        return kept
    known = [*by_name, *saved_recipes(run_dir)]
    raise QuantbenchError(f"run {run_dir} has no recipe '{name}'{suggest(name, known)} (recipes: {', '.join(known)})")


def read_run(run_dir: Path) -> tuple[RunConfig, dict]:
    if not (run_dir / "config.yaml").exists():
        raise QuantbenchError(f"{run_dir} is not a run directory (no config.yaml)")
    cfg = load_config(run_dir / "config.yaml")
    try:
        manifest = json.loads((run_dir / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        raise QuantbenchError(f"{run_dir}: manifest.json is missing or damaged; rerun `quantbench run`") from None
    return cfg, manifest


def load_run_context(run_dir: str | Path) -> RunContext:
    """Model, windows and calibration batches exactly as the run built them (one-line errors when the
    model or the corpus no longer match the fingerprints the run recorded)."""
    run_dir = Path(run_dir)
    cfg, manifest = read_run(run_dir)
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    lm = load_model(cfg.model, cfg.device, cfg.dtype)
    want = manifest.get("model", {}).get("fingerprint")
    if want and lm.info["fingerprint"] != want:
        raise QuantbenchError(f"model '{cfg.model}' changed since the run (fingerprint {lm.info['fingerprint']} != "
                              f"{want}); rerun `quantbench run` before exporting")
    corpus = load_corpus(cfg.corpus.name)
    want_c = manifest.get("corpus", {}).get("fingerprint")
    if want_c and corpus.fingerprint() != want_c:
        raise QuantbenchError(f"corpus '{cfg.corpus.name}' changed since the run; rerun `quantbench run` before exporting")
    e, tok = cfg.eval, lm.tokenizer
    windows = eval_windows(tok, corpus.eval_text, e.seq_len, e.effective_stride, e.max_windows, e.bos)
    calib_ids = calibration_batches(tok, corpus.calib_text, cfg.corpus.calib_samples, cfg.corpus.calib_seq_len, cfg.seed)
    device = next(lm.model.parameters()).device
    calib = Calibration(calib_ids, e.batch_size, device, base_key=lm.info["fingerprint"])
    log(f"export: rebuilt run {run_dir.name} ({lm.info['n_params'] / 1e6:.1f}M params, "
        f"{windows.input_ids.shape[0]} windows, {len(calib_ids)} calibration sequences)")
    return RunContext(run_dir, cfg, manifest, lm, windows, calib)
