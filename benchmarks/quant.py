"""Benchmark: calibration time per mitigation and forward throughput per recipe, as ratios to one
bare FP forward pass measured in the same run (so numbers compare across machines).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/quant.py [--model default] [--windows 4] \
        [--recipes w8a8-token w4a16-g64 ...] [--mitigations smoothquant rotate ...] [--json out.json]

Each mitigation is timed inside a representative recipe (MITIGATION_RECIPE) on a fresh copy of the
model; `calib_x_fp` = its calibration + apply seconds / seconds of one FP forward over the same
calibration batches. `tok_s_x_fp` = a recipe's forward throughput / the FP throughput.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import warnings

import torch

from quantbench.data.corpus import calibration_batches, load_corpus
from quantbench.modeling.load import load_model
from quantbench.modeling.surgery import run_batches
from quantbench.quant.apply import apply_recipe
from quantbench.quant.recipes import PRESETS

MITIGATION_RECIPE = {
    "smoothquant": "w8a8-tensor-static-sq", "outlier_tokens": "w8a8-tensor-static-ot",
    "int8_decomp": "w8a8-tensor-dynamic-int8", "rotate": "w4a4-token-rot", "gptq": "w4a16-g64-gptq",
    "awq": "w4a16-g64-awq", "clip": "w4a16-g64-awq",
}
DEFAULT_RECIPES = ["w8a8-token", "w8a8-tensor-static", "w4a16-g64", "w4a4-kv4", "w4a4-token-rot",
                   "bnb-int8", "bnb-nf4", "quanto-w4-g64"]


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


@torch.no_grad()
def throughput(model, ids: torch.Tensor, batch_size: int) -> float:
    run_batches(model, ids[:1, :16], 1, torch.device("cpu"))  # warm-up
    return ids.numel() / _timed(lambda: run_batches(model, ids, batch_size, torch.device("cpu")))


def bench_mitigation(model, name: str, calib: torch.Tensor, fp_calib_s: float) -> dict:
    recipe = PRESETS[MITIGATION_RECIPE[name]]
    _, applied = apply_recipe(copy.deepcopy(model), recipe, calib, torch.device("cpu"))
    secs = applied.notes.get(f"{name}_s", float("nan"))
    return {"mitigation": name, "recipe": recipe.name, "calib_s": secs, "calib_x_fp": round(secs / fp_calib_s, 2)}


def bench_recipe(model, name: str, calib: torch.Tensor, ids: torch.Tensor, fp_tok_s: float, bs: int) -> dict:
    from quantbench.quant.backends import BackendUnavailable

    try:
        q, _ = apply_recipe(copy.deepcopy(model), PRESETS[name], calib, torch.device("cpu"))
    except BackendUnavailable as e:
        return {"recipe": name, "tok_s": None, "tok_s_x_fp": None, "status": f"skipped: {e}"}
    tok_s = throughput(q, ids, bs)
    return {"recipe": name, "tok_s": round(tok_s, 1), "tok_s_x_fp": round(tok_s / fp_tok_s, 3), "status": "ok"}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--windows", type=int, default=4, help="evaluation sequences of 512 tokens")
    ap.add_argument("--calib", type=int, default=8, help="calibration sequences of 256 tokens")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--recipes", nargs="*", default=DEFAULT_RECIPES)
    ap.add_argument("--mitigations", nargs="*", default=list(MITIGATION_RECIPE))
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    lm = load_model(a.model, "cpu", "float32")
    corpus = load_corpus("wiki")
    calib = calibration_batches(lm.tokenizer, corpus.calib_text, a.calib, 256, 0)
    ids = calibration_batches(lm.tokenizer, corpus.eval_text, a.windows, 512, 0)
    fp_tok_s = throughput(lm.model, ids, a.batch_size)
    fp_calib_s = _timed(lambda: run_batches(lm.model, calib, a.batch_size, torch.device("cpu")))
    out = {"fp_tok_s": round(fp_tok_s, 1), "fp_calib_forward_s": round(fp_calib_s, 2), "threads": torch.get_num_threads(),
           "mitigations": [bench_mitigation(lm.model, m, calib, fp_calib_s) for m in a.mitigations],
           "recipes": [bench_recipe(lm.model, r, calib, ids, fp_tok_s, a.batch_size) for r in a.recipes]}
    print(f"FP forward: {out['fp_tok_s']} tok/s; one FP pass over the calibration batches: {fp_calib_s:.2f}s")
    print("| mitigation | recipe | calib s | x FP pass |\n|---|---|---|---|")
    for r in out["mitigations"]:
        print(f"| {r['mitigation']} | {r['recipe']} | {r['calib_s']:.2f} | {r['calib_x_fp']} |")
    print("| recipe | tok/s | x FP | status |\n|---|---|---|---|")
    for r in out["recipes"]:
        print(f"| {r['recipe']} | {r['tok_s']} | {r['tok_s_x_fp']} | {r['status']} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
