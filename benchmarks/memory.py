"""Peak memory of census, calibration, evaluation and one recipe on tiny random Llama models of
4, 8, 16 and 32 decoder layers, and the overhead beyond the weights per layer (goal: constant in depth).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/memory.py [--depths 4 8 16 32] [--hidden 256]
        [--mmap-threshold 131072]

--mmap-threshold sets glibc's MALLOC_MMAP_THRESHOLD_ in the measured processes: by default glibc raises
its threshold as large blocks are freed, after which tensors of a few MB come from the heap, whose
freed pieces are kept (not returned to the system) and inflate the resident set of a pass through a
deep model; a fixed threshold returns every large tensor to the system when it is freed.

Each depth runs in a fresh subprocess: the model is built (random, seeded) and saved as safetensors,
the weights are resident; before each phase the freed heap is handed back (gc, malloc_trim) and the
process's peak resident set is reset (VmHWM through /proc/self/clear_refs), then the phase runs.
"growth" is the peak RSS during the phase minus the RSS before it: memory beyond the weights.
Phases:
  census            quantbench.census.run_census (streaming hooks, eager attention)
  calib-parallel    input statistics of every linear incl. Gram matrices (GPTQ's Hessians), all layers
                    hooked, whole model per batch (calibration.mode: parallel)
  calib-sequential  the same statistics one decoder layer at a time (calibration.mode: sequential)
  eval              FP reference pass + a scored pass (perplexity, KL, top-1) through quantbench.eval.lm
  recipe-inplace    w8a8-tensor-static applied in place and restored (quantbench.modeling.pristine, the pipeline)
  recipe-deepcopy   the same on copy.deepcopy(model) (what the pipeline did before)
Statistics that are the result (one Gram matrix per linear input) are proportional to depth by
nature; "per layer" divides the growth by the number of layers, "marginal" is the growth added by
each extra layer between consecutive depths.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

PHASES = ("census", "calib-parallel", "calib-sequential", "eval", "recipe-inplace", "recipe-deepcopy")


def _kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _build(layers: int, hidden: int, vocab: int, folder: Path):
    import torch
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(2.75 * hidden),
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=1024, tie_word_embeddings=False)
    tf.LlamaForCausalLM(cfg).save_pretrained(folder)
    return tf.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _phase(name: str, model, folder: Path, vocab: int, args):
    """The callable that runs one phase (inputs built before the measurement starts)."""
    import copy

    import torch

    from quantbench.data.corpus import Windows
    from quantbench.modeling.surgery import linear_modules
    from quantbench.quant.calibration import Calibration, StatsRequest, collect_input_stats
    from quantbench.quant.sequential import sequential_input_stats
    from quantbench.run.config import CensusConfig

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (args.samples, args.seq_len), generator=g)
    mods = {n: m for n, m in linear_modules(model) if n != "lm_head"}
    req = StatsRequest(samples=args.samples, gram=True)
    cpu = torch.device("cpu")
    if name == "census":
        from quantbench.census import run_census

        return lambda: run_census(model, ids, None, CensusConfig(plots=False), args.batch_size)
    if name.startswith("calib"):
        fn = collect_input_stats if name == "calib-parallel" else sequential_input_stats
        return lambda: fn(model, mods, ids, args.batch_size, cpu, req)
    if name == "eval":
        from quantbench.eval.lm import evaluate_lm

        w = Windows(ids, torch.zeros(len(ids), dtype=torch.long), {})

        def run() -> None:
            _, ref = evaluate_lm(model, w, args.batch_size, cpu, keep_reference=True)
            evaluate_lm(model, w, args.batch_size, cpu, reference=ref)
            ref.close()
        return run
    from quantbench.modeling.pristine import Pristine
    from quantbench.quant.apply import apply_recipe
    from quantbench.quant.recipes import PRESETS

    recipe, calib = PRESETS.get("w8a8-tensor-static"), Calibration(ids, args.batch_size, cpu)
    if name == "recipe-inplace":
        pr = Pristine(model, folder)

        def run() -> None:
            apply_recipe(model, recipe, calib)
            with torch.no_grad():
                model(ids[:1])
            pr.restore()
        return run

    def run_copy() -> None:
        q = copy.deepcopy(model)
        apply_recipe(q, recipe, calib)
        with torch.no_grad():
            q(ids[:1])
        del q
    return run_copy


def child(args) -> None:
    import gc

    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as d:
        model = _build(args.layers, args.hidden, args.vocab, Path(d))
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        for phase in args.phase.split(","):
            fn = _phase(phase, model, Path(d), args.vocab, args)
            gc.collect()
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            Path("/proc/self/clear_refs").write_text("5")
            before = _kb("VmRSS")
            fn()
            growth = (_kb("VmHWM") - before) / 1024
            del fn
            print(json.dumps({"layers": args.layers, "phase": phase, "weights_mb": weights / 2**20,
                              "rss_before_mb": before / 1024, "growth_mb": growth}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depths", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--phases", nargs="+", default=list(PHASES), choices=PHASES)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--mmap-threshold", type=int, default=None, help="glibc MALLOC_MMAP_THRESHOLD_ (bytes)")
    ap.add_argument("--layers", type=int, help=argparse.SUPPRESS)  # child process
    ap.add_argument("--phase", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:
        child(args)
        return
    common = ["--hidden", str(args.hidden), "--vocab", str(args.vocab), "--samples", str(args.samples),
              "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
    env = dict(os.environ)
    if args.mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    res: dict[tuple[str, int], dict] = {}
    for n in args.depths:
        out = subprocess.run([sys.executable, __file__, "--layers", str(n), "--phase", ",".join(args.phases),
                              *common], capture_output=True, text=True, check=True, env=env)
        for line in out.stdout.strip().splitlines():
            if line.startswith("{"):
                r = json.loads(line)
                res[r["phase"], n] = r
    print(f"tiny Llama, hidden {args.hidden}, vocab {args.vocab}, {args.samples}x{args.seq_len} tokens, "
          f"batch {args.batch_size}, glibc mmap threshold {args.mmap_threshold or 'dynamic (default)'}; "
          "growth = peak RSS during the phase minus RSS before (weights resident)")
    print("| phase | layers | weights MiB | growth MiB | growth / layer MiB | marginal / added layer MiB |")
    print("| --- | --- | --- | --- | --- | --- |")
    for phase in args.phases:
        prev = None
        for n in args.depths:
            r = res[phase, n]
            marg = f"{(r['growth_mb'] - prev['growth_mb']) / (n - prev['layers']):.2f}" if prev else ""
            print(f"| {phase} | {n} | {r['weights_mb']:.1f} | {r['growth_mb']:.1f} | {r['growth_mb'] / n:.2f} | {marg} |")
            prev = r


if __name__ == "__main__":
    main()
