"""Evaluation throughput of each recipe as a ratio to a bare FP forward pass, measured in the same run.

    python benchmarks/throughput.py [--config configs/default.yaml] [--windows 4] [--seq-len 512] [--repeats 2]

Two ratios per recipe, both against a bare FP forward over the same tokens in the same run:
- forward: the recipe's bare forward (what quantization itself costs; goal for simulated W8A8
  per-token >= 0.8);
- eval: the recipe's whole evaluation pass (forward + NLL, KL against the FP reference, top-1).
  Scoring reads the [tokens x vocab] logits several times; with the default model's 49k
  vocabulary and small body this alone costs ~20% of a forward pass, so eval ratios sit below
  the forward ratios.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from quantbench.data.corpus import calibration_batches, eval_windows, load_corpus
from quantbench.eval.lm import evaluate_lm
from quantbench.modeling.load import load_model
from quantbench.quant.apply import apply_recipe
from quantbench.run.config import load_config


@torch.no_grad()
def bare_forward_seconds(model, ids: torch.Tensor, batch_size: int) -> float:
    t0 = time.perf_counter()
    for i in range(0, len(ids), batch_size):
        model(input_ids=ids[i: i + batch_size])
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    cfg = load_config(args.config)
    lm = load_model(cfg.model, cfg.device, cfg.dtype)
    model, tok, dev = lm.model, lm.tokenizer, next(lm.model.parameters()).device
    corpus = load_corpus(cfg.corpus.name)
    w = eval_windows(tok, corpus.eval_text, args.seq_len, args.seq_len, args.windows, True)
    calib = calibration_batches(tok, corpus.calib_text, cfg.corpus.calib_samples, cfg.corpus.calib_seq_len, cfg.seed)
    bs = cfg.eval.batch_size
    ids = w.input_ids.to(dev)
    bare_forward_seconds(model, ids[:1], 1)  # warm-up
    _, ref = evaluate_lm(model, w, bs, dev, keep_reference=True)
    n_tok = ids.numel()
    print(f"model {lm.info['source']}, {n_tok} tokens/pass, {torch.get_num_threads()} threads, {dev}")
    print(f"{'recipe':<28}{'eval tok/s':>11}{'bare FP tok/s':>15}{'forward ratio':>15}{'eval ratio':>12}")
    for recipe in cfg.recipes:
        q = model if recipe.is_fp else apply_recipe(copy.deepcopy(model), recipe, calib, dev, bs)[0]
        fwd, ratios, speeds, bares = [], [], [], []
        for _ in range(args.repeats):  # interleave bare and recipe passes so drift hits both
            bare = bare_forward_seconds(model, ids, bs)
            fwd.append(bare / bare_forward_seconds(q, ids, bs))
            res, _ = evaluate_lm(q, w, bs, dev, reference=ref)
            ratios.append(bare / res.seconds)
            speeds.append(res.tok_per_s)
            bares.append(n_tok / bare)
        print(f"{recipe.name:<28}{statistics.median(speeds):>11.0f}{statistics.median(bares):>15.0f}"
              f"{statistics.median(fwd):>15.2f}{statistics.median(ratios):>12.2f}")
        del q


if __name__ == "__main__":
    main()
