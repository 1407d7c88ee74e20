"""Everything a run needs, loaded and checked before its directory is created: the model, the
windows, the calibration batches, the evaluation suite, the manifest and the keys of the inputs."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.errors import ConfigError
from ..core.log import log
from ..data.corpus import Windows, calibration_batches, eval_windows, load_corpus
from ..eval.suite import EvalSuite
from ..modeling.load import LoadedModel, load_model
from ..modeling.offload import onloaded
from ..modeling.surgery import model_device
from ..quant.apply import prepare as plan_recipe
from ..quant.calibration import Calibration
from ..quant.sequential import sequential_input_stats
from .config import RunConfig
from .manifest import build_manifest, inputs_key, run_inputs


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

