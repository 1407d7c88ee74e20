"""One (model, recipe) cell: quantize the recipe on the loaded model, score it against the FP
reference, restore the model. CellState is what the cells of one checkpoint share in a process;
worker_cell is the Ray task body."""
from __future__ import annotations

import copy
import socket
import time
from dataclasses import dataclass

import torch

from .. import __version__
from ..census.quick import outlier_note
from ..core.errors import QuantbenchError
from ..core.log import log
from ..eval.suite import EvalSuite
from ..export.llama_cpp_check import llama_cpp_columns
from ..modeling.arch import arch_or_none
from ..modeling.load import LoadedModel
from ..modeling.memory import return_freed_memory, trim_freed_memory
from ..modeling.offload import onload
from ..modeling.pristine import Pristine
from ..quant.apply import mitigate, quantize
from ..quant.apply import prepare as plan_recipe
from ..quant.calibration import Calibration
from ..quant.effects import Effects
from ..quant.plugin import BackendUnavailable, QuantContext
from ..quant.size import measure_size
from .config import RunConfig, validate
from .manifest import changed_inputs, inputs_key
from .prepare import Prepared, prepare


@dataclass
class RecipeEnv:
    """What every recipe's row shares: calibration (cached statistics), the evaluation suite, the FP
    reference perplexity, the FP parameter count, the plan records, the FP outlier note."""

    calib: Calibration
    suite: EvalSuite
    fp_ppl: float
    n_params: int
    plans: dict  # recipe name -> its plan record (plans/<name>.json, written by the driver)
    fp_notes: dict
    pristine: Pristine | None = None  # None: each recipe works on a deep copy of the model


def capture_pristine(lm: LoadedModel) -> Pristine | None:
    """The loaded model's state, kept once: recipes quantize the model in place and it is restored after
    each (quantbench/modeling/pristine.py); values stored in the model's safetensors files are read back from them."""
    t0 = time.perf_counter()
    pr = Pristine(lm.model, lm.folder)
    log(f"pristine state kept ({pr.file_bytes / 2**20:.0f} MB read back from the model files, "
        f"{pr.clone_bytes / 2**20:.0f} MB cloned) in {time.perf_counter() - t0:.1f}s")
    return pr


def _outliers(model, env: RecipeEnv, plan, key: str) -> dict:
    """The outlier note of `model` (mitigated FP) as row columns `<name>_<key>` (before: cached)."""
    ids, mods = env.calib.batches[:2, :128], {n: model.get_submodule(n) for n in plan.linears}
    if key == "before":
        names = tuple(plan.linears)
        if names not in env.fp_notes:
            env.fp_notes[names] = outlier_note(model, ids, mods, env.calib.batch_size)
        note = env.fp_notes[names]
    else:
        note = outlier_note(model, ids, mods, env.calib.batch_size)
    return {f"{k}_{key}": v for k, v in note.items()}


def quantizes_kv(recipe) -> bool:
    """Whether a recipe quantizes K/V (its own kv spec or an override's): its rows get the decode-order columns."""
    return recipe.kv is not None or any(o.kv is not None for o in recipe.overrides)


def _run_recipe(model, recipe, env: RecipeEnv) -> dict:
    """One recipe's row. With env.pristine the recipe is applied to `model` itself and the model is
    restored afterwards (even on error); without, to a deep copy (the reference path of the tests)."""
    row = {"recipe": recipe.name, "mode": recipe.backend, "w_bits": recipe.weights.bits if recipe.weights else None,
           "a_bits": recipe.activations.bits if recipe.activations else None,
           "mitigations": "+".join(m.name for m in recipe.mitigations) or "none", "quantbench": __version__}
    t0, ledger0 = time.perf_counter(), len(env.calib.ledger)
    ctx = None
    try:
        qmodel = model if env.pristine is not None else copy.deepcopy(model)
        if env.pristine is not None:
            onload(qmodel)  # offloaded modules (device_map 'disk') made real for the recipe; restore() undoes it
        plan = plan_recipe(qmodel, recipe)
        # the row needs the dequantized weights and their size, not the stored codes (export keeps those)
        ctx = QuantContext(plan=plan, calib=env.calib, arch=arch_or_none(qmodel), keep_stored=False)
        notes: dict = {}
        if recipe.mitigations:
            notes.update(_outliers(qmodel, env, plan, "before"))
            t1 = time.perf_counter()
            mitigate(qmodel, ctx)
            t_mit = time.perf_counter() - t1
            notes.update(_outliers(qmodel, env, plan, "after"))
            census_s = time.perf_counter() - t0 - t_mit
        else:
            census_s = 0.0
        qmodel = quantize(qmodel, ctx)
        trim_freed_memory()  # quantization's temporaries, before the evaluation's peak
        size = measure_size(qmodel, plan, ctx.effects, env.n_params)
        calib_s = time.perf_counter() - t0 - census_s  # the census of the mitigated model is not calibration
        spent, reused = env.calib.seconds(ledger0)
        res, extra = env.suite.score(qmodel, ctx.effects, kv=quantizes_kv(recipe))
        if ctx.effects.gguf_file is not None:  # llama.cpp scores the file the backend wrote, beside ours
            extra = {**extra, **llama_cpp_columns(qmodel, ctx.effects.gguf_file, env.suite.windows,
                                                  env.suite.device, res.ppl)}
    except BackendUnavailable as err:
        return {**row, "status": f"skipped: {err}", "wall_s": round(time.perf_counter() - t0, 2)}
    finally:
        if ctx is not None:
            ctx.effects.cleanup()  # the backend's temporary files (the llamacpp GGUF)
        if env.pristine is not None:
            env.pristine.restore()  # the next recipe starts from the loaded model again
        trim_freed_memory()  # the recipe's freed tensors leave glibc's heap (modeling/memory.py)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    env.plans[recipe.name] = {**plan.to_json(), "bits": {
        "total": size.total_bits, "per_linear": {k: round(v) for k, v in size.per_linear.items()}}}
    row.update(status="ok", mode=plan.mode, bits_per_weight=round(size.bits_per_weight, 3),
               size_mb=round(size.mb, 2), weight_bytes=size.bytes, ppl=res.ppl,
               delta_ppl_pct=100 * (res.ppl / env.fp_ppl - 1), kl=res.kl, top1=res.top1,
               eval_tok_s=round(res.tok_per_s, 1), calib_s=round(calib_s, 2), calib_stats_s=round(spent, 2),
               calib_stats_reused=reused, census_s=round(census_s, 2),
               wall_s=round(time.perf_counter() - t0, 2), n_tokens=res.n_tokens,
               **ctx.effects.notes, **notes, **extra)
    return row


class CellState:
    """What the cells of one checkpoint share in one process: the prepared inputs (model,
    calibration with its statistics cache, evaluation suite), the FP reference (evaluated on the
    first cell, once per process) and the FP outlier notes."""

    def __init__(self, cfg: RunConfig, p: Prepared) -> None:
        self.cfg, self.p = cfg, p
        self.n_params = sum(t.numel() for t in p.lm.model.parameters())
        self.fp_eval, self.fp_extra = None, {}
        self.fp_notes: dict = {}
        self.pristine: Pristine | None = None  # the loaded model's state, captured before the first quantized recipe

    def _reference(self) -> None:
        if self.fp_eval is not None:
            return
        log("FP reference: evaluating the unquantized model once")
        self.fp_eval, self.fp_extra = self.p.suite.reference(self.p.lm.model)
        trim_freed_memory()
        fp, e = self.fp_eval, self.cfg.eval
        log(f"FP perplexity {fp.ppl:.3f} over {fp.n_tokens} tokens ({fp.tok_per_s:.0f} tok/s)")
        if e.expected_fp_ppl and abs(fp.ppl / e.expected_fp_ppl - 1) > 0.10:
            log(f"warning: FP perplexity {fp.ppl:.2f} differs from the expected {e.expected_fp_ppl} by more than 10%")

    def compute(self, name: str) -> tuple[dict, dict | None]:
        """One recipe's row and its plan record (None for FP and skipped recipes)."""
        recipe = next(x for x in self.cfg.recipes if x.name == name)
        self._reference()
        model, fp_eval = self.p.lm.model, self.fp_eval
        if recipe.is_fp:  # the reference pass already measured it
            size = measure_size(model, plan_recipe(model, recipe), Effects(), self.n_params)
            return {"recipe": recipe.name, "status": "ok", "mode": "fp", "bits_per_weight": size.bits_per_weight,
                    "size_mb": round(size.mb, 2), "ppl": fp_eval.ppl, "delta_ppl_pct": 0.0, "kl": 0.0,
                    "top1": 1.0, "eval_tok_s": round(fp_eval.tok_per_s, 1), "calib_s": 0.0,
                    "wall_s": round(fp_eval.seconds, 2), "n_tokens": fp_eval.n_tokens, "mitigations": "none",
                    "weight_bytes": size.bytes, **self.fp_extra}, None
        if self.pristine is None:
            self.pristine = capture_pristine(self.p.lm)
        env = RecipeEnv(self.p.calib, self.p.suite, fp_eval.ppl, self.n_params, {}, self.fp_notes, self.pristine)
        row = _run_recipe(model, recipe, env)
        return row, env.plans.get(recipe.name)


_WORKER: dict[str, CellState] = {}  # a worker process's state: one checkpoint at a time, kept across tasks


def worker_cell(cfg_json: dict, recipe: str, inputs: dict) -> tuple[dict, dict | None]:
    """One (model, recipe) cell in a worker process (the Ray task body). The first cell of a
    checkpoint in this process rebuilds its shared state (load, calibration batches, evaluation
    suite; the FP reference on first use); later cells reuse it. The inputs must equal the driver's."""
    cfg = validate(RunConfig, cfg_json)
    key = cfg.fingerprint()  # everything that changes results (not the output folder)
    if key not in _WORKER:
        _WORKER.clear()  # one checkpoint's weights per worker
        return_freed_memory()  # freed tensors go back to the system (quantbench/modeling/memory.py)
        torch.manual_seed(cfg.seed)
        torch.set_num_threads(cfg.threads or max(1, int(cfg.executor.num_cpus)))
        p = prepare(cfg)
        if p.rows_key != inputs_key(inputs):
            what = ", ".join(changed_inputs(inputs, p.inputs)[:4]) or "unknown inputs"
            raise QuantbenchError(f"worker on {socket.gethostname()}: the inputs of {cfg.model} differ from the "
                                  f"driver's ({what}); give every node the same files, packages and device kind")
        _WORKER[key] = CellState(cfg, p)
    return _WORKER[key].compute(recipe)

