"""Peers: the same quantization work through llm-compressor and torchao and through quantbench, on the
default model, with the same calibration tokens, scored identically on quantbench's evaluation windows.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/peers.py [--quick] [--pairs NAME ... | all] \
        [--config configs/default.yaml] [--out results/benchmarks/peers] [--threads N]

One machine, one run: the model, calibration tokens (corpus.calib_samples x corpus.calib_seq_len of the
config, seed cfg.seed) and evaluation windows (eval.max_windows x eval.seq_len) are the config's
(configs/default.yaml: SmolLM2-135M-Instruct, 16 x 256 calibration tokens, 8 x 512 evaluation tokens).
`--quick` (1 window, 4 calibration samples, QUICK_PAIRS) checks the whole path end to end in minutes.
Each finished pair is appended to `<out>.rows.jsonl`; an interrupted run, rerun with the same model, tokens
and windows, measures only the pairs still missing (each row keeps its `measured_at`), and the file is
removed once `<out>.json` and `.md` are written.

llm-compressor pins an older transformers and compressed-tensors, so it runs in its own virtual
environment (`--peer-venv`, default .venv-peers, created on first use: `--torch-spec` (default: this
venv's torch version, the local CPU wheel here; `--torch-index-url` for another index), then
llmcompressor==LLMC_VERSION), never a project dependency. The FP model as quantbench loads it is saved
with save_pretrained and the calibration ids with torch.save into a temporary folder; `oneshot` runs in a
subprocess of that venv (this file, `--peer-child`) and saves a compressed-tensors checkpoint, which this
process reloads through quantbench's export verification loader (quantbench.export.verify.reload_compressed:
transformers + compressed-tensors, which run the stored weights and the checkpoint's activation
quantization) and scores. torchao runs in this venv on a copy of the FP model (quantize_, lm_head left out).

Per side of each pair: calibration seconds (the one call that calibrates and quantizes: oneshot /
apply_recipe / quantize_; model load, save and reload excluded; quantbench's architecture trace, done once
per model in a run and carried by every copy, is timed once beforehand and reported apart), peak memory
(peak RSS growth during that call, as benchmarks/census.py measures it: malloc_trim and a VmHWM reset,
then VmHWM minus VmRSS before, with the model already resident; the peer measures inside its own
process), and on the windows
(quantbench.eval.lm.evaluate_lm against the FP reference, one window per forward): perplexity, Δppl % and
KL(P_fp || P_q) with paired 95% bootstrap intervals (quantbench.eval.intervals), top-1 agreement; per pair
the peer's perplexity relative to quantbench's (paired interval: can they be told apart?). A side that
cannot run here is recorded with a one-line reason and the run goes on.

Cost on 2 CPU cores shared with other jobs (expect less on an idle machine): --quick about 7 minutes;
llm-compressor's GPTQ and AWQ about 20 minutes each with 4 calibration rows (GPTQ's per-column loop and
AWQ's grid search, not the calibration passes, dominate); torchao's int8 CPU path scores about 7x slower
than the simulated model (its evaluation is not in calib s).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

LLMC_VERSION = "0.14.0.1"  # newest llmcompressor on the registry; pins transformers<=5.17, compressed-tensors==0.19.0
PEER_PACKAGES = ("llmcompressor", "compressed-tensors", "transformers", "torch", "accelerate", "datasets", "numpy")
OUR_PACKAGES = ("quantbench", "torch", "transformers", "compressed-tensors", "torchao", "numpy")
ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Pair:
    """One comparison: a peer recipe (`peer`: llmcompressor | torchao, `peer_recipe`: a key of the
    peer's recipe table) against a quantbench recipe entry (a preset name or a config mapping)."""

    name: str
    peer: str
    peer_recipe: str
    quantbench: str | dict
    differs: str
    calib_options: tuple[str, ...] = ()  # mitigations whose calib_samples is set to the run's calibration rows


def _w4(sym: bool) -> dict:
    return {"bits": 4, "granularity": "group", "group_size": 64, "symmetric": sym}


PAIRS = [
    Pair("llmc-w4a16-g64", "llmcompressor", "w4a16-g64", "w4a16-g64",
         "same algorithm and grid (round-to-nearest, symmetric int4, group 64, minmax scale absmax/7.5), data-free; "
         "llm-compressor's oneshot computes scales only (codes are packed by save_pretrained: save_compressed_s), "
         "quantbench's apply computes codes and dequantized weights"),
    Pair("llmc-w4a16-g64-gptq", "llmcompressor", "w4a16-g64-gptq", "w4a16-g64-gptq",
         "both sequential (layer inputs from the already-quantized layers), damp 0.01, block 128; llm-compressor's "
         "default actorder=static (columns by descending diag H, group scales fitted up front), quantbench's "
         "act_order false (groups fitted as reached) and token-normalised Hessian (token_norm)", ("gptq",)),
    Pair("llmc-w4a16-g64-asym-awq", "llmcompressor", "w4a16-g64-asym-awq",
         {"preset": "w4a16-g64-awq", "name": "w4a16-g64-asym-awq", "weights": _w4(False)},
         "asymmetric int4 g64 on both; llm-compressor: pairs qkv, gate/up, up->down (it skips v->o on this GQA "
         "model: 'incompatible shapes'), duo scaling (activation and weight means), 20-point grid, loss on the parent "
         "block's output over every calibration token, sequential; quantbench: the same pairs plus v->o (scales "
         "shared per kv head), activation-mean scales, 10-point grid, per-linear loss on 512 sampled tokens, "
         "then a weight-clipping search (clip)", ("awq", "clip")),
    Pair("llmc-w8a8", "llmcompressor", "w8a8", "w8a8-token",
         "same scheme (compressed-tensors INT8_W8A8: int8 symmetric per-channel weights, dynamic symmetric "
         "per-token int8 activations), round-to-nearest, data-free (timing as llmc-w4a16-g64)"),
    Pair("llmc-w8a8-sq", "llmcompressor", "w8a8-sq",
         {"preset": "w8a8-token", "name": "w8a8-token-sq",
          "mitigations": [{"name": "smoothquant", "options": {"alpha": 0.5, "pairs": ["qkv", "up"]}}]},
         "SmoothQuant alpha 0.5 on llm-compressor's default Llama mappings (norm->q/k/v, norm->gate/up; quantbench's "
         "default would add up->down and v->o), then W8A8 per-token round-to-nearest on both sides", ("smoothquant",)),
    Pair("torchao-w8a8", "torchao", "int8-dyn-act-int8-weight", "w8a8-token",
         "same grid (int8 symmetric per-channel weights, dynamic symmetric per-token activations); torchao runs "
         "real int8 matmuls (Int8Tensor), quantbench simulates in fp32"),
    Pair("torchao-w4a16-g64", "torchao", "int4-weight-only-g64", {"preset": "w4a16-g64", "name": "w4a16-g64-asym",
                                                                   "weights": _w4(False)},
         "Int4WeightOnlyConfig(group_size=64): asymmetric int4 with a float zero point (tinygemm) vs quantbench's "
         "asymmetric int4 with an integer zero point"),
    Pair("torchao-w4a16-g64-intx", "torchao", "intx-int4-weight-only-g64", "w4a16-g64",
         "IntxWeightOnlyConfig(int4, PerGroup(64), symmetric): the same grid as w4a16-g64 (scale absmax/7.5), "
         "torchao's CPU-capable int4 weight-only path (codes in int8, dequantized per forward)"),
]
PAIR_NAMES = [p.name for p in PAIRS]
QUICK_PAIRS = ["llmc-w8a8-sq", "torchao-w8a8"]  # calibration data through both venvs; GPTQ takes ~20 min


# ---------------------------------------------------------------- memory and time (both venvs)

def _rss_kb(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    return 0


def measured(fn) -> tuple[object, float, float]:
    """(fn(), wall seconds, peak RSS growth in MiB while it ran): benchmarks/census.py's measure (Linux; 0 elsewhere)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
        before = _rss_kb("VmRSS")
    except (OSError, AttributeError):
        before = None
    t0 = time.perf_counter()
    out = fn()
    secs = time.perf_counter() - t0
    growth = max(0, _rss_kb("VmHWM") - before) / 1024 if before is not None else 0.0
    return out, secs, growth


def one_line(e: BaseException) -> str:
    text = (str(e).strip().splitlines() or [""])[0].strip()
    return f"{type(e).__name__}: {text}"[:200]


# ---------------------------------------------------------------- the llm-compressor child (peer venv)

def _llmc_recipe(name: str) -> tuple[list, bool]:
    """(modifiers, needs calibration data) of a peer recipe."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform import AWQModifier, SmoothQuantModifier

    def w4(sym: bool) -> dict:
        args = QuantizationArgs(num_bits=4, type="int", strategy="group", group_size=64, symmetric=sym, dynamic=False)
        return {"group_0": QuantizationScheme(targets=["Linear"], weights=args)}

    ign = ["lm_head"]
    w8a8 = {"scheme": "W8A8", "targets": ["Linear"], "ignore": ign}
    table = {
        "w4a16-g64": ([QuantizationModifier(config_groups=w4(True), ignore=ign)], False),
        "w4a16-g64-gptq": ([GPTQModifier(config_groups=w4(True), ignore=ign)], True),
        "w4a16-g64-asym-awq": ([AWQModifier(), QuantizationModifier(config_groups=w4(False), ignore=ign)], True),
        "w8a8": ([QuantizationModifier(**w8a8)], False),
        "w8a8-sq": ([SmoothQuantModifier(smoothing_strength=0.5), QuantizationModifier(**w8a8)], True),
    }
    return table[name]


def _cpu_patch() -> str | None:
    """llm-compressor 0.14.0.1's AWQModifier pins its cached activations (a host-to-device speed-up) whether or
    not there is an accelerator, which fails on a CPU-only machine ("RuntimeError: Cannot access accelerator
    device when none is available"); without one, pinning is made a no-op (the values are unchanged)."""
    import torch
    from llmcompressor.pipelines.cache import IntermediatesCache

    if torch.accelerator.is_available():
        return None
    IntermediatesCache.pin_memory = lambda self, *a, **k: None
    return "IntermediatesCache.pin_memory made a no-op (no accelerator: AWQ's unconditional pinning fails on CPU)"


def peer_child(args) -> None:
    """Runs in the peer venv: oneshot on the saved FP model with the saved calibration ids, then save."""
    work, out = Path(args.work), Path(args.work) / args.peer_child
    out.mkdir(parents=True, exist_ok=True)
    res: dict = {"recipe": args.peer_child}
    try:
        import torch
        from torch.utils.data import DataLoader
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(args.threads)
        from llmcompressor import oneshot

        model = AutoModelForCausalLM.from_pretrained(work / "fp", dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(work / "fp")
        ids = torch.load(work / "calib.pt")  # [N, T]
        modifiers, needs_data = _llmc_recipe(args.peer_child)
        res["patch"] = _cpu_patch()
        rows = [{"input_ids": r, "attention_mask": torch.ones_like(r)} for r in ids]
        loader = DataLoader(rows, batch_size=1, shuffle=False) if needs_data else None
        kw = {"dataset": loader, "num_calibration_samples": len(rows), "max_seq_length": ids.shape[1]} if needs_data else {}
        _, res["calib_s"], res["peak_mb"] = measured(lambda: oneshot(model=model, tokenizer=tok, recipe=modifiers, **kw))
        res["peak_rss_mb"] = _rss_kb("VmHWM") / 1024  # the child's whole resident peak during oneshot
        res["calibration"] = f"{len(rows)} x {ids.shape[1]} tokens" if needs_data else "none (data-free)"
        _, res["save_s"], _ = measured(lambda: model.save_pretrained(out / "ckpt", save_compressed=True))  # codes packed here
        tok.save_pretrained(out / "ckpt")
    except Exception as e:  # noqa: BLE001 - a peer failure is a result: one line, the run goes on
        res["error"] = one_line(e)
    (out / "result.json").write_text(json.dumps(res))


# ---------------------------------------------------------------- the peer venv

def _pip(py: Path, *args: str) -> None:
    subprocess.run([str(py), "-m", "pip", "install", "-q", *args], check=True, capture_output=True, text=True)


def ensure_peer_venv(venv: Path, torch_spec: str, torch_index: str | None) -> str | None:
    """Create (once) the peer venv; None when ready, else a one-line reason."""
    py, marker = venv / "bin" / "python", venv / ".peers-installed"
    want = json.dumps({"llmcompressor": LLMC_VERSION, "torch": torch_spec, "index": torch_index})
    if py.exists() and marker.exists() and marker.read_text() == want:
        return None
    print(f"creating {venv} (torch: {torch_spec}, llmcompressor=={LLMC_VERSION}); a few minutes ...", flush=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, text=True)
        _pip(py, torch_spec, *(["--index-url", torch_index] if torch_index else []))
        _pip(py, f"llmcompressor=={LLMC_VERSION}")
    except subprocess.CalledProcessError as e:
        lines = [ln for ln in (e.stderr or "").splitlines() if ln.strip() and not ln.startswith("WARNING")]
        return f"peer venv: {' '.join(map(str, e.cmd[-2:]))} failed: {(lines or ['?'])[-1][:160]}"
    marker.write_text(want)
    return None


def freeze(py: Path, names: tuple[str, ...]) -> dict:
    out = subprocess.run([str(py), "-m", "pip", "list", "--format", "json"], capture_output=True, text=True)
    try:
        got = {d["name"].lower(): d["version"] for d in json.loads(out.stdout)}
    except json.JSONDecodeError:
        return {}
    return {n: got.get(n) for n in names}


def our_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for n in OUR_PACKAGES:
        try:
            out[n] = version(n)
        except PackageNotFoundError:
            out[n] = None
    return out


# ---------------------------------------------------------------- the sides of a pair

@dataclass
class Side:
    recipe: str
    status: str = "ok"
    calib_s: float | None = None
    peak_mb: float | None = None
    notes: dict = field(default_factory=dict)
    lm: object = None  # LMEval (kept for the paired comparison, not written)

    def row(self, fp) -> dict:
        from quantbench.eval.intervals import ppl_change, ratio_of_sums

        d = {"recipe": self.recipe, "status": self.status, "calib_s": _r(self.calib_s, 2), "peak_mb": _r(self.peak_mb, 0),
             **self.notes}
        if self.lm is not None:
            u, f = self.lm.units, fp.units
            dp, kl = ppl_change(u.nll, f.nll, u.tokens), ratio_of_sums(u.kl, u.tokens)
            d.update(ppl=_r(self.lm.ppl, 3), dppl_pct=_iv(dp, 2), kl=_iv(kl, 4), top1=_r(self.lm.top1, 4),
                     eval_s=_r(self.lm.seconds, 1))
        return d


def _r(x: float | None, nd: int) -> float | None:
    return None if x is None else round(float(x), nd)


def _iv(iv, nd: int) -> dict:
    return {"estimate": round(iv.estimate, nd), "lo": round(iv.lo, nd), "hi": round(iv.hi, nd)}


def score(model, ctx) -> object:
    import torch

    from quantbench.eval.lm import evaluate_lm

    res, _ = evaluate_lm(model, ctx.windows, 1, torch.device("cpu"), reference=ctx.ref)
    return res


def quantbench_side(entry, ctx, pair: Pair) -> Side:
    import copy

    import torch

    from quantbench.quant.apply import apply_recipe
    from quantbench.quant.recipes import resolve_recipe

    recipe = resolve_recipe(entry)
    if pair.calib_options:  # every calibration row, as the peer sees (the presets' default is 8)
        mits = [m.model_copy(update={"options": {**m.options, "calib_samples": len(ctx.calib)}})
                if m.name in pair.calib_options else m for m in recipe.mitigations]
        recipe = recipe.model_copy(update={"mitigations": tuple(mits)})
    side = Side(recipe.name)
    q = copy.deepcopy(ctx.model)
    try:
        (q, applied), side.calib_s, side.peak_mb = measured(
            lambda: apply_recipe(q, recipe, ctx.calib, torch.device("cpu"), batch_size=1))
        side.notes["bits_per_weight"] = _r(applied.size.bits_per_weight, 2)
        side.notes["mitigations"] = [m.model_dump(mode="json") for m in recipe.mitigations]
        side.lm = score(q, ctx)
    except Exception as e:  # noqa: BLE001
        side.status = f"failed: {one_line(e)}"
    return side


TORCHAO_WHY = {"int4-weight-only-g64": " (torchao 0.18's Int4WeightOnlyConfig layouts are accelerator kernels: plain and "
                "preshuffled need mslk, plain_int32 is XPU/NPU only, tile_packed_to_4d is CUDA tinygemm in bf16; its CPU "
                "int4 weight-only path is IntxWeightOnlyConfig: pair torchao-w4a16-g64-intx)"}


def torchao_side(name: str, ctx) -> Side:
    import copy

    import torch

    side = Side(name)
    try:
        from torchao.quantization import (Int4WeightOnlyConfig, Int8DynamicActivationInt8WeightConfig,
                                          IntxWeightOnlyConfig, PerGroup, quantize_)

        cfg = {"int8-dyn-act-int8-weight": lambda: Int8DynamicActivationInt8WeightConfig(),
               "int4-weight-only-g64": lambda: Int4WeightOnlyConfig(group_size=64),
               "intx-int4-weight-only-g64": lambda: IntxWeightOnlyConfig(weight_dtype=torch.int4,
                                                                         granularity=PerGroup(64))}[name]()
        side.notes["config"] = repr(cfg)[:200]
        q = copy.deepcopy(ctx.model)
        keep = lambda m, fqn: isinstance(m, torch.nn.Linear) and fqn != "lm_head"  # noqa: E731 - as quantbench's exclude
        _, side.calib_s, side.peak_mb = measured(lambda: quantize_(q, cfg, filter_fn=keep))
        side.notes["calibration"] = "none (data-free)"
        side.lm = score(q, ctx)
    except Exception as e:  # noqa: BLE001
        side.status = f"failed: {one_line(e)}" + TORCHAO_WHY.get(name, "")
    return side


def llmc_side(name: str, ctx, args) -> Side:
    import torch

    from quantbench.export.verify import reload_compressed

    side = Side(name)
    if ctx.peer_error:
        side.status = f"not run: {ctx.peer_error}"
        return side
    py = Path(args.peer_venv) / "bin" / "python"
    cmd = [str(py), str(Path(__file__).resolve()), "--peer-child", name, "--work", str(ctx.work),
           "--threads", str(ctx.threads)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.peer_timeout, env=env)
    except subprocess.TimeoutExpired:
        side.status = f"failed: timed out after {args.peer_timeout} s"
        return side
    side.notes["subprocess_s"] = _r(time.perf_counter() - t0, 1)
    res_file = ctx.work / name / "result.json"
    if not res_file.exists():
        tail = [ln for ln in proc.stderr.splitlines() if ln.strip()][-1:] or [f"exit {proc.returncode}"]
        side.status = f"failed: {tail[0][:200]}"
        return side
    res = json.loads(res_file.read_text())
    if "error" in res:
        side.status = f"failed: {res['error']}"
        return side
    side.calib_s, side.peak_mb = res["calib_s"], res["peak_mb"]
    side.notes.update(calibration=res["calibration"], save_compressed_s=_r(res["save_s"], 1),
                      peer_peak_rss_mb=_r(res["peak_rss_mb"], 0))
    if res.get("patch"):
        side.notes["patch"] = res["patch"]
    try:
        ckpt = ctx.work / name / "ckpt"
        qc = json.loads((ckpt / "config.json").read_text()).get("quantization_config", {})
        side.notes["checkpoint_format"] = qc.get("format")
        side.lm = score(reload_compressed(ckpt, torch.float32, None, torch.device("cpu")), ctx)
    except Exception as e:  # noqa: BLE001
        side.status = f"failed: reload/score in our venv: {one_line(e)}"
    return side


# ---------------------------------------------------------------- the run

@dataclass
class Ctx:
    model: object
    windows: object
    calib: object
    ref: object
    fp: object
    threads: int
    work: Path | None = None
    peer_error: str | None = None


def compare(peer: Side, qb: Side) -> dict | None:
    """The peer's perplexity relative to quantbench's, paired over the same blocks."""
    from quantbench.eval.intervals import ppl_change

    if peer.lm is None or qb.lm is None:
        return None
    a, b = peer.lm.units, qb.lm.units
    return {**_iv(ppl_change(a.nll, b.nll, b.tokens), 2), "identical": a.nll == b.nll and a.kl == b.kl}


def _cpu_name() -> str | None:
    try:
        return next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name"))
    except (OSError, StopIteration):
        return None


def setup(args):
    import torch

    from quantbench.data.corpus import calibration_batches, eval_windows, load_corpus
    from quantbench.eval.lm import evaluate_lm
    from quantbench.modeling.arch import arch_of
    from quantbench.modeling.load import load_model
    from quantbench.run.config import load_config

    cfg = load_config(args.config if Path(args.config).exists() else ROOT / args.config)
    e = cfg.eval
    n_calib, n_win = (4, 1) if args.quick else (cfg.corpus.calib_samples, e.max_windows)
    n_calib, n_win = args.calib_samples or n_calib, args.windows or n_win
    lm = load_model(cfg.model, "cpu", "float32")
    corpus = load_corpus(cfg.corpus.name)
    windows = eval_windows(lm.tokenizer, corpus.eval_text, e.seq_len, e.effective_stride, n_win, e.bos)
    calib = calibration_batches(lm.tokenizer, corpus.calib_text, n_calib, cfg.corpus.calib_seq_len, cfg.seed)
    fp, ref = evaluate_lm(lm.model, windows, 1, torch.device("cpu"), keep_reference=True)
    _, trace_s, _ = measured(lambda: arch_of(lm.model))  # once per model in a quantbench run; copies carry it
    protocol = {"config": args.config, "model": lm.info.get("source", cfg.model), "model_fingerprint": lm.info["fingerprint"],
                "corpus": corpus.name, "calibration": f"{len(calib)} x {calib.shape[1]} tokens (split calib, seed {cfg.seed})",
                "windows": windows.protocol, "dtype": "float32", "device": "cpu", "threads": torch.get_num_threads(),
                "cpus": os.cpu_count(), "cpu": _cpu_name(), "quick": args.quick,
                "quantbench_arch_trace_s": _r(trace_s, 1)}
    return lm, Ctx(lm.model, windows, calib, ref, fp, torch.get_num_threads()), protocol


def prepare_peer(args, lm, ctx: Ctx, pairs: list[Pair]) -> dict:
    import torch

    if not any(p.peer == "llmcompressor" for p in pairs):
        return {}
    ctx.peer_error = ensure_peer_venv(Path(args.peer_venv), args.torch_spec, args.torch_index_url)
    if ctx.peer_error:
        return {}
    ctx.work = Path(tempfile.mkdtemp(prefix="quantbench-peers-"))
    lm.model.save_pretrained(ctx.work / "fp")
    lm.tokenizer.save_pretrained(ctx.work / "fp")
    torch.save(ctx.calib, ctx.work / "calib.pt")
    return freeze(Path(args.peer_venv) / "bin" / "python", PEER_PACKAGES)


RESUME_KEYS = ("config", "model", "model_fingerprint", "corpus", "calibration", "windows", "dtype", "device", "quick")


def rows_path(out: str) -> Path:
    """Finished pairs of an unfinished run, one JSON line each: a rerun with the same protocol resumes."""
    return Path(out).with_suffix(".rows.jsonl")


def _resume_key(protocol: dict) -> dict:
    return {k: protocol.get(k) for k in RESUME_KEYS}


def load_rows(out: str, protocol: dict) -> dict[str, dict]:
    """Rows measured under the same protocol (model, tokens, windows) by an interrupted run."""
    path, key, rows = rows_path(out), _resume_key(protocol), {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                d = json.loads(line)
            except json.JSONDecodeError:  # a line cut by the interruption
                continue
            if d.get("protocol") == key:
                rows[d["row"]["pair"]] = d["row"]
    return rows


def save_row(out: str, protocol: dict, row: dict) -> None:
    path = rows_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps({"protocol": _resume_key(protocol), "row": row}) + "\n")


def _progress(tag: str, side: Side, t_start: float) -> Side:
    got = f"calib {side.calib_s:.1f} s, peak +{side.peak_mb:.0f} MiB" if side.calib_s is not None else ""
    if side.lm is not None:
        got += f", ppl {side.lm.ppl:.3f}, KL {side.lm.kl:.4f}"
    print(f"[{time.perf_counter() - t_start:6.0f}s]   {tag} {side.recipe}: {side.status}; {got}", flush=True)
    return side


def run(args) -> dict:
    import shutil
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    names = PAIR_NAMES if args.pairs == ["all"] else (args.pairs or (QUICK_PAIRS if args.quick else PAIR_NAMES))
    pairs = [p for p in PAIRS if p.name in names]
    lm, ctx, protocol = setup(args)
    done_rows = load_rows(args.out, protocol)
    todo = [p for p in pairs if p.name not in done_rows]
    if done_rows:
        print(f"resuming: {len(pairs) - len(todo)} of {len(pairs)} pairs already measured in {rows_path(args.out)}")
    peer_versions = prepare_peer(args, lm, ctx, todo)
    qb_done: dict[str, Side] = {}
    try:
        for p in todo:
            print(f"[{time.perf_counter() - t_start:6.0f}s] {p.name} ...", flush=True)
            key = json.dumps([p.quantbench, p.calib_options], sort_keys=True)
            if key not in qb_done:
                qb_done[key] = _progress("quantbench", quantbench_side(p.quantbench, ctx, p), t_start)
            qb = qb_done[key]
            peer = torchao_side(p.peer_recipe, ctx) if p.peer == "torchao" else llmc_side(p.peer_recipe, ctx, args)
            _progress(p.peer, peer, t_start)
            done_rows[p.name] = {"pair": p.name, "peer": p.peer, "differs": p.differs, "peer_side": peer.row(ctx.fp),
                                 "quantbench_side": qb.row(ctx.fp), "peer_vs_quantbench_ppl_pct": compare(peer, qb),
                                 "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
            save_row(args.out, protocol, done_rows[p.name])
    finally:
        ctx.ref.close()
        if ctx.work is not None and not args.keep_work:
            shutil.rmtree(ctx.work, ignore_errors=True)
    rows = [done_rows[p.name] for p in pairs]
    peer_py = Path(args.peer_venv) / "bin" / "python"
    if not peer_versions and any(p.peer == "llmcompressor" for p in pairs) and peer_py.exists():
        peer_versions = freeze(peer_py, PEER_PACKAGES)  # every llm-compressor row was resumed
    return {"protocol": protocol, "fp": {"ppl": _r(ctx.fp.ppl, 3), "n_tokens": ctx.fp.n_tokens},
            "versions": {"ours": our_versions(), "peer_venv": peer_versions},
            "llmcompressor_pin": LLMC_VERSION, "rows": rows, "total_s": _r(time.perf_counter() - t_start, 0)}


# ---------------------------------------------------------------- output

def _fmt_iv(d: dict | None, nd: int) -> str:
    if not d:
        return ""
    return f"{d['estimate']:+.{nd}f} [{d['lo']:+.{nd}f}, {d['hi']:+.{nd}f}]" if nd == 1 else \
        f"{d['estimate']:.{nd}f} [{d['lo']:.{nd}f}, {d['hi']:.{nd}f}]"


def _cell(x, fmt: str) -> str:
    return "" if x is None else format(x, fmt)


def table(result: dict) -> str:
    """The results as Markdown (what --out's .md holds after its header)."""
    head = ("| pair | side | recipe | calib s | peak MiB | ppl | Δppl % [95% CI] | KL [95% CI] | top-1 | "
            "peer vs quantbench ppl % | status |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in result["rows"]:
        for tag, s in (("peer: " + r["peer"], r["peer_side"]), ("quantbench", r["quantbench_side"])):
            c = r["peer_vs_quantbench_ppl_pct"]
            cmp = ("identical" if c and c.get("identical") else _fmt_iv(c, 1)) if tag != "quantbench" else ""
            lines.append(f"| {r['pair']} | {tag} | {s['recipe']} | {_cell(s['calib_s'], '.1f')} | "
                         f"{_cell(s['peak_mb'], '.0f')} | {_cell(s.get('ppl'), '.2f')} | {_fmt_iv(s.get('dppl_pct'), 1)} | "
                         f"{_fmt_iv(s.get('kl'), 3)} | {_cell(s.get('top1'), '.3f')} | {cmp} | {s['status']} |")
    return "\n".join(lines)


def markdown(result: dict) -> str:
    p, v = result["protocol"], result["versions"]
    ver = lambda d: ", ".join(f"{k} {x}" for k, x in d.items() if x) or "not created"  # noqa: E731
    out = [f"# Peers: llm-compressor and torchao vs quantbench{' (--quick)' if p['quick'] else ''}", "",
           f"Model {p['model']} (fp32, CPU: {p['cpus']} x {p['cpu']}, {p['threads']} torch threads); calibration "
           f"{p['calibration']}; evaluation {p['windows']['windows']} x {p['windows']['seq_len']} tokens "
           f"({p['windows']['scored_tokens']} scored), FP perplexity {result['fp']['ppl']}; total {result['total_s']} s; "
           f"quantbench's architecture trace (once per model, not in calib s): {p['quantbench_arch_trace_s']} s.",
           f"Our venv: {ver(v['ours'])}.", f"Peer venv: {ver(v['peer_venv'])}.", "", table(result), "",
           "calib s: the call that calibrates and quantizes (oneshot / apply_recipe / quantize_); peak MiB: peak RSS "
           "growth during it. Δppl and KL vs FP, and the peer's perplexity vs quantbench's, are paired 95% bootstrap "
           "intervals over 128-token blocks; `identical`: every block's NLL and KL are equal bit for bit.", "",
           "Where each pair differs:", ""]
    out += [f"- `{r['pair']}`: {r['differs']}" for r in result["rows"]]
    return "\n".join(out) + "\n"


def write(result: dict, out: str) -> None:
    base = Path(out)
    base.parent.mkdir(parents=True, exist_ok=True)
    base.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    base.with_suffix(".md").write_text(markdown(result))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    import torch  # the default torch spec for the peer venv: this venv's version (the local CPU wheel here)

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--quick", action="store_true", help="1 window, 4 calibration samples, QUICK_PAIRS")
    ap.add_argument("--pairs", nargs="*", choices=[*PAIR_NAMES, "all"], default=None)
    ap.add_argument("--windows", type=int, default=None, help="evaluation windows (default: the config's)")
    ap.add_argument("--calib-samples", type=int, default=None, help="calibration rows (default: the config's)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads, both venvs (default: torch's choice)")
    ap.add_argument("--out", default=None, help="output path without suffix (default results/benchmarks/peers, "
                                                "peers-quick with --quick)")
    ap.add_argument("--peer-venv", default=str(ROOT / ".venv-peers"))
    ap.add_argument("--torch-spec", default=f"torch=={torch.__version__.split('+')[0]}")
    ap.add_argument("--torch-index-url", default=None, help="pip index for the peer venv's torch (e.g. a CPU index)")
    ap.add_argument("--peer-timeout", type=int, default=3600, help="seconds per llm-compressor recipe")
    ap.add_argument("--keep-work", action="store_true", help="keep the temporary folder (FP model, checkpoints)")
    ap.add_argument("--peer-child", help=argparse.SUPPRESS)  # runs in the peer venv
    ap.add_argument("--work", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.out = a.out or str(ROOT / "results" / "benchmarks" / ("peers-quick" if a.quick else "peers"))
    return a


def main(argv: list[str] | None = None) -> dict | None:
    os.environ.setdefault("TQDM_DISABLE", "1")  # read when tqdm is imported: progress bars of every library, both venvs
    if "--peer-child" in (argv if argv is not None else sys.argv):
        ap = argparse.ArgumentParser()
        ap.add_argument("--peer-child")
        ap.add_argument("--work")
        ap.add_argument("--threads", type=int)
        peer_child(ap.parse_args(argv))
        return None
    args = parse_args(argv)
    result = run(args)
    write(result, args.out)
    rows_path(args.out).unlink(missing_ok=True)
    print(markdown(result))
    print(f"wrote {Path(args.out).with_suffix('.json')} and .md")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
