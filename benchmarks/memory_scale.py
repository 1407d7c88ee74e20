"""Peak memory of the real pipeline at the sizes users run: `quantbench run` on random Llama models of
about 135M, 500M and 1.2B parameters (fp32, CPU) loaded from a folder, and the memory model fitted to them:

    peak RSS = constant + alpha x weight bytes + beta x logits bytes

    flock /work/model.lock env HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/memory_scale.py
        [--points 135m:256 135m:1024 500m:256 1b:256] [--workdir /tmp] [--out results/benchmarks]

Each point is `shape:eval_seq_len[:dtype]` (dtype float32 by default, or bfloat16). For each point a fresh
subprocess builds the shape (random weights, seed 0, `save_pretrained` in that dtype into a temporary
folder with the default model's tokenizer), and another fresh
subprocess runs `quantbench run --model <folder>` in-process (the CLI's own `main`) on a small config:
fp, w8a8-token, w4a16-g64 and w8a8-tensor-static-sq; 2 evaluation windows (eval batch 1), 4
calibration samples of 256 tokens, the census on (4 x 256 tokens, no plots), downstream tasks off.
The shapes (their vocabulary is the model's; the input ids come from the SmolLM2 tokenizer, < 49152):
  135m  SmolLM2-135M: hidden 576, 30 layers, MLP 1536, 9/3 heads, vocab 49152, tied embeddings
  500m  Qwen2.5-0.5B-like: hidden 896, 24 layers, MLP 4864, 14/2 heads, vocab 151936, tied
  1b    TinyLlama-1.1B-like: hidden 2048, 22 layers, MLP 5632, 32/4 heads, vocab 49152 (TinyLlama's 32000
        would not hold the tokenizer's ids), untied
The 135M shape is also run with 1024-token windows so that the logits term varies apart from the weights.

Peak RSS is the kernel's high-water mark (VmHWM in /proc/self/status). The pipeline itself resets it
(every evaluation's `peak_mem_mb` column, quantbench/eval/cost.py), and so does this benchmark between
phases, so the process's final VmHWM (and /usr/bin/time's maximum resident set) would miss earlier peaks:
here every reset first folds the high-water mark into the phase that was running (load, census, FP
reference, pristine capture, each recipe's mitigate / quantize / eval / restore), and the run's peak is
the largest of them. "logits bytes" = eval batch x seq_len x vocab x 4 (one forward's logits in fp32, as
the evaluation reads them); "weight bytes" = the parameters in the point's dtype (tied ones once). The fit
is least squares over the float32 points; other dtypes are shown against its prediction. The outputs also
extrapolate the fit to a 7B (Llama-2-7B: 6.74B parameters, vocab 32000) and a 70B model (Llama-3-70B:
70.6B, vocab 128256) at the default evaluation (one 512-token window per forward), in fp32 and bf16.
Writes <out>/memory_scale.json and <out>/memory_scale.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {  # name: (hidden, layers, intermediate, heads, kv heads, vocab, tied)
    "135m": (576, 30, 1536, 9, 3, 49152, True),
    "500m": (896, 24, 4864, 14, 2, 151936, True),
    "1b": (2048, 22, 5632, 32, 4, 49152, False),
}
RECIPES = ["fp", "w8a8-token", "w4a16-g64", "w8a8-tensor-static-sq"]


def _kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def build(shape: str, dtype: str, folder: Path) -> dict:
    """The shape with random weights (seed 0), saved in `dtype` with the default model's tokenizer."""
    import torch
    import transformers as tf

    from quantbench.data import wheels

    h, n, inter, heads, kv, vocab, tied = SHAPES[shape]
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=h, intermediate_size=inter, num_hidden_layers=n,
                         num_attention_heads=heads, num_key_value_heads=kv, head_dim=h // heads,
                         max_position_embeddings=2048, tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2,
                         pad_token_id=2, rms_norm_eps=1e-5)
    model = tf.LlamaForCausalLM(cfg).eval().to(getattr(torch, dtype))
    model.save_pretrained(folder)
    tf.AutoTokenizer.from_pretrained(wheels.ensure_default_model()).save_pretrained(folder)
    params = {id(p): p for p in model.parameters()}.values()
    return {"shape": shape, "dtype": dtype, "hidden": h, "layers": n, "intermediate": inter, "vocab": vocab, "tied": tied,
            "n_params": sum(p.numel() for p in params), "weight_bytes": sum(p.numel() * p.element_size() for p in params)}


class Ledger:
    """Peak RSS per phase: at each phase boundary the high-water mark is folded into the phase that ran
    and reset (so is every reset the pipeline does itself). Between the wrapped phases the segment is
    named after the phase before it ("after load")."""

    def __init__(self) -> None:
        self.label, self.recipe, self.segments = "imports", "", []
        self.rss0, self.peak = _kb("VmRSS"), 0

    def fold(self) -> None:
        self.peak = max(self.peak, _kb("VmHWM"))
        Path("/proc/self/clear_refs").write_text("5")

    def enter(self, label: str) -> str:
        """Close the running segment (its RSS at start and end, its peak) and start `label`."""
        self.fold()
        rss = _kb("VmRSS")
        self.segments.append({"phase": self.label, "rss_start_mb": self.rss0 / 1024, "rss_end_mb": rss / 1024,
                              "peak_mb": self.peak / 1024})
        prev, self.label, self.rss0, self.peak = self.label, label, rss, 0
        return prev

    def wrap(self, owner, attr: str, label: str, per_recipe: bool = True) -> None:
        fn = getattr(owner, attr)
        ledger = self

        def wrapped(*a, **k):
            name = f"{label}:{ledger.recipe}" if per_recipe and ledger.recipe else label
            ledger.enter(name)
            try:
                return fn(*a, **k)
            finally:
                ledger.enter(f"after {name}")
        setattr(owner, attr, wrapped)


def child_run(folder: Path, seq_len: int, dtype: str, out_dir: Path, threads: int) -> dict:
    """`quantbench run --model folder` in this process, the peak RSS of every phase folded into a ledger."""
    import yaml

    t_start = time.perf_counter()
    ledger = Ledger()
    import torch  # noqa: F401 - the imports a run needs, counted in the constant

    import quantbench.cli as cli
    import quantbench.eval.cost as cost
    import quantbench.run.cell as cell
    import quantbench.run.pipeline as pipeline
    import quantbench.run.prepare as prep
    from quantbench.eval.suite import EvalSuite
    from quantbench.modeling.pristine import Pristine

    rss_imports = _kb("VmRSS")

    def reset_hwm() -> bool:  # the pipeline's own resets (peak_mem_mb columns) keep the ledger whole
        ledger.fold()
        return True
    cost._reset_hwm = reset_hwm
    ledger.wrap(prep, "load_model", "load", per_recipe=False)
    ledger.wrap(pipeline, "run_census", "census", per_recipe=False)
    ledger.wrap(EvalSuite, "reference", "fp-reference", per_recipe=False)
    ledger.wrap(cell, "capture_pristine", "pristine-capture", per_recipe=False)
    ledger.wrap(cell, "_outliers", "outlier-note")
    ledger.wrap(cell, "mitigate", "mitigate")
    ledger.wrap(cell, "quantize", "quantize")
    ledger.wrap(EvalSuite, "score", "eval")
    ledger.wrap(Pristine, "restore", "restore")
    run_recipe = cell._run_recipe

    def named(model, recipe, env):
        ledger.recipe = recipe.name
        try:
            return run_recipe(model, recipe, env)
        finally:
            ledger.recipe = ""
    cell._run_recipe = named

    cfg = {"corpus": {"name": "wiki", "calib_samples": 4, "calib_seq_len": 256},
           "eval": {"seq_len": seq_len, "max_windows": 2, "batch_size": 1},
           "census": {"samples": 4, "seq_len": 256, "plots": False},
           "tasks": {"names": []}, "threads": threads, "dtype": dtype, "recipes": RECIPES}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    ledger.enter("start")
    try:
        cli.main(["run", "--config", str(out_dir / "config.yaml"), "--model", str(folder),
                  "--out", str(out_dir), "--run-id", "run"])
    except SystemExit as e:
        if e.code:
            raise
    ledger.enter("end")
    rows = [json.loads(x) for x in (out_dir / "run" / "rows.jsonl").read_text().splitlines() if x.strip()]
    top = max(ledger.segments, key=lambda x: x["peak_mb"])
    return {"peak_mb": top["peak_mb"], "rss_after_imports_mb": rss_imports / 1024, "peak_phase": top["phase"],
            "phases": ledger.segments,
            "rows": {r["recipe"]: {k: r.get(k) for k in ("status", "ppl", "kl", "top1", "bits_per_weight")} for r in rows},
            "rows_digest": rows_digest(rows),
            "run_s": round(time.perf_counter() - t_start, 1)}


def rows_digest(rows: list[dict]) -> str:
    """sha256 of the rows without their measured costs (seconds, throughput, memory, cache reuse, versions):
    equal digests = bit-identical results."""
    import hashlib

    skip = {"peak_mem_mb", "eval_tok_s", "calib_stats_reused", "quantbench"}
    keep = [{k: v for k, v in sorted(r.items()) if k not in skip and not k.endswith("_s")} for r in rows]
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()


EXTRAPOLATE = {"7B (Llama-2-7B)": (6.74e9, 32000), "70B (Llama-3-70B)": (70.6e9, 128256)}  # params, vocab
DEFAULT_EVAL_TOKENS = 512  # configs/default.yaml: eval.seq_len 512, eval.batch_size 1


def fit(points: list[dict]) -> dict:
    """peak = constant + alpha x weight bytes + beta x logits bytes, least squares over the float32 points."""
    import numpy as np

    rows = [p for p in points if p["dtype"] == "float32"]
    a = np.array([[1.0, p["weight_bytes"], p["logits_bytes"]] for p in rows])
    y = np.array([p["peak_mb"] * 2**20 for p in rows])
    coef, *_ = np.linalg.lstsq(a, y, rcond=None)
    c, alpha, beta = (float(v) for v in coef)
    pred = lambda w, lg: (c + alpha * w + beta * lg) / 2**20  # noqa: E731
    ext = {f"{name} {dt}": {"weights_gib": n * nb / 2**30,
                            "peak_gib": pred(n * nb, DEFAULT_EVAL_TOKENS * v * 4) * 2**20 / 2**30}
           for name, (n, v) in EXTRAPOLATE.items() for dt, nb in (("fp32", 4), ("bf16", 2))}
    return {"constant_mb": c / 2**20, "alpha": alpha, "beta": beta, "points": len(rows),
            "residuals_mb": [p["peak_mb"] - pred(p["weight_bytes"], p["logits_bytes"]) for p in points],
            "extrapolated": ext}


def _label(p: dict) -> str:
    return f"{p['shape']}:{p['seq_len']}" + ("" if p["dtype"] == "float32" else f":{p['dtype']}")


def _md(res: dict) -> str:
    f, lines = res["fit"], []
    lines += [f"# Peak memory vs model size ({res['date']})", "",
              f"Command: `{res['command']}`  ", f"Machine: {res['machine']}  ",
              f"Recipes: {', '.join(res['recipes'])}; eval batch 1, 2 windows; 4 x 256 calibration and census tokens", "",
              "| point | params | weights MiB | vocab | eval tokens | logits MiB | peak RSS MiB | peak / weights "
              "| phase at peak | runtime after imports MiB | peak - fit MiB | run s |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for p, r in zip(res["points"], f["residuals_mb"]):
        lines.append(f"| {_label(p)} | {p['n_params'] / 1e6:.1f}M | {p['weight_bytes'] / 2**20:.0f} | "
                     f"{p['vocab']} | 1 x {p['seq_len']} | {p['logits_bytes'] / 2**20:.0f} | {p['peak_mb']:.0f} | "
                     f"{p['peak_mb'] * 2**20 / p['weight_bytes']:.2f}x | {p['peak_phase']} | "
                     f"{p['rss_after_imports_mb']:.0f} | {r:+.0f} | {p['run_s']:.0f} |")
    lines += ["", f"Fit (least squares over the {f['points']} float32 points): **peak = {f['constant_mb']:.0f} MiB + "
              f"{f['alpha']:.3f} x weight bytes + {f['beta']:.2f} x logits bytes**", "",
              f"Extrapolated (eval batch 1 x {DEFAULT_EVAL_TOKENS} tokens, logits in fp32):", "",
              "| model | weights GiB | peak GiB |", "| --- | --- | --- |"]
    lines += [f"| {k} | {v['weights_gib']:.1f} | {v['peak_gib']:.1f} |" for k, v in f["extrapolated"].items()]
    for p in res["points"]:
        lines += ["", f"{_label(p)}: RSS at the start and end of each phase and its peak (MiB)", "",
                  "| phase | RSS start | RSS end | peak |", "| --- | --- | --- | --- |"]
        lines += [f"| {x['phase']} | {x['rss_start_mb']:.0f} | {x['rss_end_mb']:.0f} | {x['peak_mb']:.0f} |"
                  for x in p["phases"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", nargs="+", default=["135m:256", "135m:1024", "500m:256", "1b:256"])
    ap.add_argument("--workdir", default=None, help="where the model folders and run directories go (default $TMPDIR)")
    ap.add_argument("--out", default=str(ROOT / "results" / "benchmarks"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default="memory_scale", help="file stem of the outputs in --out")
    ap.add_argument("--keep-rows", default=None, help="copy each point's rows.jsonl into this folder")
    ap.add_argument("--build", help=argparse.SUPPRESS)  # child: build a shape into a folder
    ap.add_argument("--run", help=argparse.SUPPRESS)  # child: run quantbench on a folder
    ap.add_argument("--seq-len", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--dtype", help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.build:
        print(json.dumps(build(args.build, args.dtype, Path(args.folder))), flush=True)
        return
    if args.run:
        print(json.dumps(child_run(Path(args.folder), args.seq_len, args.dtype, Path(args.run), args.threads)), flush=True)
        return
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    points, built = [], {}

    def child(*extra: str) -> dict:
        out = subprocess.run([sys.executable, __file__, *extra], capture_output=True, text=True, env=env, cwd=ROOT)
        if out.returncode:
            sys.exit(f"child {extra} failed:\n{out.stderr[-4000:]}")
        return json.loads([x for x in out.stdout.splitlines() if x.startswith("{")][-1])

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for spec in args.points:
            shape, seq, dtype = (spec.split(":") + ["float32"])[:3]
            key, folder = f"{shape}-{dtype}", Path(tmp) / f"{shape}-{dtype}"
            if key not in built:  # one folder at a time (a point's shape and dtype), built in its own process
                for old in list(built):
                    shutil.rmtree(Path(tmp) / old, ignore_errors=True)
                    del built[old]
                built[key] = child("--build", shape, "--dtype", dtype, "--folder", str(folder))
            info, run_dir = built[key], Path(tmp) / f"run-{key}-{seq}"
            r = child("--run", str(run_dir), "--folder", str(folder), "--seq-len", seq, "--dtype", dtype,
                      "--threads", str(args.threads))
            if args.keep_rows:
                Path(args.keep_rows).mkdir(parents=True, exist_ok=True)
                shutil.copy(run_dir / "run" / "rows.jsonl", Path(args.keep_rows) / f"{key}-{seq}.rows.jsonl")
            p = {**info, "seq_len": int(seq), "eval_batch": 1, "logits_bytes": int(seq) * info["vocab"] * 4, **r}
            points.append(p)
            print(f"{spec}: {info['n_params'] / 1e6:.1f}M params, weights {info['weight_bytes'] / 2**20:.0f} MiB, "
                  f"peak {r['peak_mb']:.0f} MiB ({r['peak_mb'] * 2**20 / info['weight_bytes']:.2f}x) in "
                  f"{r['peak_phase']}, {r['run_s']:.0f}s", flush=True)
    res = {"date": datetime.date.today().isoformat(),
           "command": "HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/memory_scale.py " + " ".join(sys.argv[1:]),
           "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads {args.threads}, "
                      f"load average {os.getloadavg()[0]:.2f} at the end",
           "recipes": RECIPES, "points": points, "fit": fit(points)}
    md = _md(res)
    print(md)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(res, indent=1) + "\n")
    (out / f"{args.name}.md").write_text(md)


if __name__ == "__main__":
    main()
