"""Census overhead: wall time and peak memory of the census as ratios to a bare forward pass over
the same tokens, measured in the same run (goal: <= 1.1x time; memory growth independent of depth).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/census.py [--samples 4 --seq-len 256 --repeats 2]

Peak memory is the process's peak resident set (VmHWM, reset through /proc/self/clear_refs before
each measurement, Linux) minus the resident set before it. Memory is measured with the full model
and with only its first half of the decoder layers: a census whose state does not grow with depth
shows the same growth for both.
"""
from __future__ import annotations

import argparse
import ctypes
import time
from pathlib import Path

import torch


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _peak_growth_mb(fn) -> float:
    """Peak RSS growth while fn() runs, in MiB (Linux; 0 elsewhere). Freed heap memory is handed back
    (malloc_trim) first, so what an earlier measurement left cached does not hide this one's growth."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
    except (OSError, AttributeError):
        return 0.0
    before = _rss_kb("VmRSS")
    fn()
    return max(0, _rss_kb("VmHWM") - before) / 1024


def _timed(fn) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def measure(model, batches: torch.Tensor, batch_size: int, repeats: int) -> dict:
    from quantbench.census import run_census
    from quantbench.census.core import _collect
    from quantbench.core.hooks import eager_attention
    from quantbench.run.config import CensusConfig

    cfg = CensusConfig(plots=False)

    @torch.no_grad()
    def bare() -> None:
        for s in range(0, len(batches), batch_size):
            model(input_ids=batches[s: s + batch_size], use_cache=False)

    def eager() -> None:
        with eager_attention(model):
            bare()

    bare()  # warm-up
    inf = (float("inf"), float("inf"))
    t_bare, t_eager, t_pass, t_full = inf, inf, inf, inf
    for _ in range(repeats):  # interleaved, best of each (wall and CPU separately): robust to a busy machine
        t_bare = tuple(map(min, t_bare, _timed(bare)))
        t_eager = tuple(map(min, t_eager, _timed(eager)))
        t_pass = tuple(map(min, t_pass, _timed(lambda: _collect(model, batches, cfg, batch_size))))
        t_full = tuple(map(min, t_full, _timed(lambda: run_census(model, batches, None, cfg, batch_size))))
    return {"bare_s": t_bare, "eager_s": t_eager, "pass_s": t_pass, "census_s": t_full,
            "mem_bare_mb": _peak_growth_mb(bare),
            "mem_census_mb": _peak_growth_mb(lambda: run_census(model, batches, None, cfg, batch_size))}


def main() -> None:
    from quantbench.data.corpus import calibration_batches, load_corpus
    from quantbench.modeling.arch import arch_of
    from quantbench.modeling.load import load_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model(args.model, "cpu", "float32")
    batches = calibration_batches(lm.tokenizer, load_corpus("wiki").eval_text, args.samples, args.seq_len, 0)
    model = lm.model
    full = measure(model, batches, args.batch_size, args.repeats)
    layers = model.get_submodule(arch_of(model).layers)
    n = len(layers)
    parent, name = arch_of(model).layers.rsplit(".", 1)
    setattr(model.get_submodule(parent), name, layers[: n // 2])
    half = measure(model, batches, args.batch_size, 1)
    setattr(model.get_submodule(parent), name, layers)
    print(f"tokens {batches.numel()} ({args.samples}x{args.seq_len}), {n} layers, threads {torch.get_num_threads()}")
    for k, tag in ((0, "wall"), (1, "CPU")):
        b, p, c = full["bare_s"][k], full["pass_s"][k], full["census_s"][k]
        e = full["eager_s"][k]
        print(f"{tag}: bare forward {b:.2f}s | eager-attention forward {e:.2f}s | census pass {p:.2f}s | "
              f"whole census {c:.2f}s | ratios: eager / bare {e / b:.2f}x, streaming pass / bare {p / b:.2f}x, "
              f"whole census (incl. weight scan) / bare {c / b:.2f}x")
    for tag, r in ((f"{n} layers", full), (f"{n // 2} layers", half)):
        print(f"peak memory growth, {tag}: bare {r['mem_bare_mb']:.0f} MiB, census {r['mem_census_mb']:.0f} MiB, "
              f"ratio {r['mem_census_mb'] / max(r['mem_bare_mb'], 1e-9):.2f}x")


if __name__ == "__main__":
    main()
