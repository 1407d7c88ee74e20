"""The `profile` command: the outlier census alone."""
from __future__ import annotations

from pathlib import Path

import torch

from ..census import run_census, write_census
from ..core.log import log
from ..data.corpus import calibration_batches, load_corpus
from ..modeling.load import load_model
from . import rundir
from .config import RunConfig


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

