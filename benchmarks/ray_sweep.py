"""The default model's recipe sweep three ways: serial, Ray with 1 worker, Ray with 2 workers.

    flock /work/model.lock python benchmarks/ray_sweep.py [--config configs/default.yaml]
        [--windows 4] [--seq-len 256] [--calib-samples 8] [--out /tmp/ray_sweep]

Every variant runs the config's recipes on its model with one torch thread per cell (so the
worker count is the only difference), census and downstream tasks off, into a fresh run
directory. Prints each wall time, the ratios, and whether the Ray rows equal the serial rows
(every column but measured costs: seconds, throughput, memory, cache reuse). Each Ray worker
rebuilds the checkpoint's state (load, calibration batches, FP reference) once, so two workers pay
that twice: the speed-up is below 2 on few recipes and rises with the sweep's length.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

COSTS = {"calib_stats_reused", "peak_mem_mb"}  # and every column in seconds (`*_s`)


def _cfg(base, out: Path, name: str, executor: dict):
    from quantbench.run.config import parse_config

    d = base.model_dump(mode="json")
    d.update(output_dir=str(out), run_id=name, threads=1, executor=executor)
    d["census"]["enabled"] = False
    d["tasks"]["names"] = []
    return parse_config(d)


def _rows(out: Path) -> dict[str, dict]:
    from quantbench.core.fileio import read_rows

    return {r["recipe"]: {k: v for k, v in r.items() if k not in COSTS and not k.endswith("_s")}
            for r in read_rows(out / "rows.jsonl")}


def _timed(cfg) -> tuple[float, Path]:
    from quantbench.run.pipeline import run

    t0 = time.perf_counter()
    out = run(cfg)
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--calib-samples", type=int, default=8)
    ap.add_argument("--out", default="/tmp/ray_sweep")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from quantbench.run.config import load_config

    base = load_config(args.config)
    base = base.model_copy(update={
        "eval": base.eval.model_copy(update={"seq_len": args.seq_len, "max_windows": args.windows}),
        "corpus": base.corpus.model_copy(update={"calib_samples": args.calib_samples})})
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    load1 = os.getloadavg()[0]
    times, outs = {}, {}
    times["serial"], outs["serial"] = _timed(_cfg(base, out, "serial", {"kind": "serial"}))
    for n in (1, 2):  # a fresh local Ray with n CPUs: n workers of 1 CPU each
        name = f"ray-{n}"
        times[name], outs[name] = _timed(_cfg(base, out, name, {"kind": "ray", "num_cpus": 1, "local_cpus": n}))
    ref = _rows(outs["serial"])
    same = {k: _rows(v) == ref for k, v in outs.items() if k != "serial"}
    print(f"\nmodel {base.model}, {len(base.recipes)} recipes, eval {args.windows}x{args.seq_len} tokens, "
          f"calibration {args.calib_samples}x{base.corpus.calib_seq_len}, 1 torch thread per cell, "
          f"{os.cpu_count()} CPUs, load average {load1:.2f} at start, {os.getloadavg()[0]:.2f} at end")
    print("| executor | wall s | vs serial | rows equal serial |\n| --- | --- | --- | --- |")
    for k, t in times.items():
        print(f"| {k} | {t:.1f} | {times['serial'] / t:.2f}x | {same.get(k, '-')} |")
    print(f"ray 2 workers vs 1 worker: {times['ray-1'] / times['ray-2']:.2f}x faster")
    print(json.dumps({"seconds": {k: round(v, 1) for k, v in times.items()}, "rows_equal": same}))


if __name__ == "__main__":
    main()
