"""The retrofit experiment end to end: load the pretrained model once, continue-train the control and
every graft on the same calibration tokens (resumable), sweep each final checkpoint (and the
untouched pretrained model) through the normal pipeline, write the comparison. Rerunning resumes:
finished variants are skipped, an interrupted one continues from its checkpoint, finished sweep rows
are kept by the pipeline's own resume."""
from __future__ import annotations

import json
import platform
import re
from pathlib import Path

import torch

from ... import __version__
from ...core.errors import QuantbenchError
from ...core.log import log
from ...data.corpus import load_corpus
from ...modeling.load import load_model
from ...run.config import parse_config
from ..compare import add_convergence, default_targets, load_sweep
from ..data import TokenData
from .config import RetrofitConfig
from .loop import RetrofitLog, RetrofitTrainer, penalty_layers
from .model import CONTROL
from .report import summary, write_report

PRETRAINED = "pretrained"  # the sweep of the untouched pretrained model


def _ids(tokenizer, text: str, limit: int | None = None) -> torch.Tensor:
    """Token ids of `text` (of its shortest prefix giving `limit` tokens, when given)."""
    n = len(text) if limit is None else min(len(text), max(4096, limit * 8))
    while True:
        ids = tokenizer(text[:n], add_special_tokens=False)["input_ids"]
        if limit is None or len(ids) >= limit or n >= len(text):
            return torch.tensor(ids if limit is None else ids[:limit], dtype=torch.long)
        n *= 2


def load_data(cfg: RetrofitConfig, tokenizer, cache: Path) -> TokenData:
    """Training tokens: the corpus's calibration text only. Held out: the first heldout_tokens tokens
    of its evaluation text (what the sweep's perplexity windows read too)."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if cache.exists():
        d = torch.load(cache)
        return TokenData(d["train"], d["heldout"], bos, d["source"])
    corpus = load_corpus(cfg.data.corpus)
    train = _ids(tokenizer, corpus.calib_text)
    heldout = _ids(tokenizer, corpus.eval_text, cfg.data.heldout_tokens)
    if len(train) < 4 * cfg.optim.context or len(heldout) < cfg.data.heldout_tokens:
        raise QuantbenchError(f"corpus '{cfg.data.corpus}' too short: {len(train)} calibration tokens (need "
                              f"{4 * cfg.optim.context}) and {len(heldout)} evaluation tokens (need {cfg.data.heldout_tokens})")
    data = TokenData(train, heldout, bos, f"{corpus.source}; trains on the calibration text, {corpus.split}")
    torch.save({"train": data.train, "heldout": data.heldout, "source": data.source}, cache)
    return data


def _manifest(cfg: RetrofitConfig, device: torch.device, data: TokenData, info: dict) -> dict:
    return {"quantbench": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "device": str(device), "config": cfg.model_dump(mode="json"), "data_source": data.source,
            "train_tokens": len(data.train), "heldout_tokens": len(data.heldout), "model": info,
            "fingerprint": cfg.fingerprint()}


def train_variants(cfg: RetrofitConfig, config_name: str = "retrofit", on_step=None) -> dict[str, RetrofitLog]:
    """Train (or resume, or skip finished) the control and every graft; returns their logs."""
    out = cfg.run_dir(config_name)
    out.mkdir(parents=True, exist_ok=True)
    lm = load_model(cfg.model, cfg.device, "float32")
    device = next(lm.model.parameters()).device
    lm.model.eval()
    for p in lm.model.parameters():
        p.requires_grad_(False)
    penalty_layers(lm.model, cfg.penalty)  # penalty.layers against the model, before any work
    data = load_data(cfg, lm.tokenizer, out / "tokens.pt")
    (out / "manifest.json").write_text(json.dumps(_manifest(cfg, device, data, lm.info), indent=1, default=str))
    log(f"run directory: {out} ({len(data.train)} calibration tokens to train on, {len(data.heldout)} held out, {device})")
    logs = {}
    for v in cfg.variants:
        logs[v] = RetrofitTrainer(cfg, v, lm.model, lm.tokenizer, data, out / v, device, on_step=on_step).run()
        log(f"{v}: done, held-out loss {logs[v].heldout[-1][2]:.3f} ({logs[v].seconds:.0f}s)")
    return logs


def sweep_config(cfg: RetrofitConfig, name: str, model: str, root: Path) -> dict:
    s = cfg.sweep
    return {"run_id": name, "output_dir": str(root), "seed": cfg.seed, "model": model, "device": cfg.device,
            "dtype": "float32", "threads": cfg.threads,
            "corpus": {"name": cfg.data.corpus, "calib_samples": s.calib_samples, "calib_seq_len": cfg.optim.context},
            "eval": {"seq_len": s.eval_seq_len, "max_windows": s.eval_windows, "batch_size": s.batch_size},
            "census": {"enabled": False},  # the probes of the run hold the census of every checkpoint
            "recipes": list(s.recipes)}


def sweep_id(variant: str) -> str:
    """The variant's sweep folder (a plain run_id): 'kv_bias@sink_logit_init=-10' -> 'kv_bias_sink_logit_init=-10'."""
    return re.sub(r"[^A-Za-z0-9._+=-]", "_", variant)


def run_sweep(cfg: RetrofitConfig, name: str, model: str, root: Path) -> dict[str, dict]:
    """The quantization sweep (quantbench.run.pipeline.run) of one checkpoint -> its ok rows by recipe.
    A recipe the checkpoint refuses before any work (e.g. rotation where a graft reads the layer norm's
    output) is dropped from this variant's sweep and kept as a row with status 'refused' and the reason."""
    from ...run.pipeline import run as run_pipeline

    log(f"{name}: quantization sweep")
    recipes, refused, rid = list(cfg.sweep.recipes), {}, sweep_id(name)
    while True:
        sc = {**sweep_config(cfg, rid, model, root), "recipes": recipes}
        try:
            path = run_pipeline(parse_config(sc), config_name=rid)
            break
        except QuantbenchError as e:
            m = re.match(r"recipe '([^']+)': (.*)", str(e))
            if not m or m.group(1) not in recipes or m.group(1) == "fp":
                raise
            log(f"{name}: {m.group(1)} refused on this checkpoint ({m.group(2)[:160]})")
            recipes.remove(m.group(1))
            refused[m.group(1)] = {"status": "refused", "reason": m.group(2)}
    return {**load_sweep(path)[1], **refused}


def run_retrofit(cfg: RetrofitConfig, config_name: str = "retrofit", on_step=None) -> Path:
    """Train, sweep, compare. Returns the path of retrofit.md."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = cfg.run_dir(config_name)
    logs = train_variants(cfg, config_name, on_step)
    rows = {}
    if cfg.sweep.enabled:
        rows[PRETRAINED] = run_sweep(cfg, PRETRAINED, cfg.model, out / "sweep")
        for v in cfg.variants:
            rows[v] = run_sweep(cfg, v, str(out / v / "final"), out / "sweep")
    summaries = [summary(v, logs[v], rows.get(v, {})) for v in cfg.variants]
    ref = CONTROL if CONTROL in logs else cfg.variants[0]
    targets = default_targets(logs[ref])
    add_convergence(summaries, logs, targets, ref)
    recipes = [r for r in cfg.sweep.recipes if r != "fp"] if cfg.sweep.enabled else []
    path = write_report(out, summaries, recipes, targets, ref, rows.get(PRETRAINED, {}),
                        cfg.penalty.model_dump(mode="json"))
    log(f"comparison: {path}")
    return path
