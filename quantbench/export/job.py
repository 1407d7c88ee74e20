"""`quantbench export RUN_DIR --recipe NAME --out DIR [--format compressed-tensors|gguf]`:
re-apply a measured recipe exactly as the run did, write it, reload it, prove it.

    rc = load_run_context("results/<run-id>")          # model, windows, calibration as measured
    cols = export_recipe(rc, "w8a8-token", Path("out"))  # write + reload + verify + speed
    record_export(rc.run_dir, "w8a8-token", cols)       # row columns, exports.md, tables, report

Mitigations run one at a time through the same plugin calls as the sweep (quant.apply.mitigate), so
a mitigation whose declared Effects the format cannot express (an online transform, inputs kept in
high precision) is refused right after it ran, naming it and the closest exportable recipe.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn as nn

from ..core.errors import QuantbenchError
from ..core.fileio import read_json_or_none
from ..core.log import log
from ..eval.lm import evaluate_lm
from ..modeling.arch import arch_or_none
from ..quant.apply import mitigate, prepare, quantize
from ..quant.plan import Plan
from ..quant.plugin import BackendUnavailable, QuantContext
from ..quant.spec import Recipe
from .context import RunContext
from .record import row_check
from .refuse import check_effects, check_recipe, export_format
from .runtime import llama_cpp_eval, model_mb, torchao_eval, vllm_eval
from .verify import (
    VERIFY_PPL_TOL,
    Tee,
    compare_stored,
    compare_weights,
    dense_only,
    kv_cache_check,
    packed_asymmetric,
    reload_compressed,
    reload_gguf,
    stored_only,
    tokenizer_matches,
)

MARKER = "quantbench_export.json"  # written into every export folder (and required to overwrite one)


def _mitigate_checked(model: nn.Module, ctx: QuantContext, fmt: str) -> None:
    """ctx.recipe's mitigations in order, each through quant.apply.mitigate; refuse as soon as one
    declares what `fmt` cannot express."""
    recipe = ctx.recipe
    for m in recipe.mitigations:
        online0, keep0 = set(ctx.effects.online), ctx.effects.keeps_in_high_precision()
        step = QuantContext(plan=Plan(recipe.model_copy(update={"mitigations": (m,)}), ctx.plan.linears,
                                      ctx.plan.excluded), calib=ctx.calib, arch=ctx.arch, upstream=ctx.upstream,
                            effects=ctx.effects)
        mitigate(model, step)
        ctx.upstream = step.upstream
        keep = {n: k for n, k in ctx.effects.keeps_in_high_precision().items() if keep0.get(n) != k}
        check_effects(recipe, m.name, sorted(set(ctx.effects.online) - online0), keep, fmt)


FILE_SUFFIXES = (".gguf", ".safetensors", ".bin", ".pt", ".json")


def check_out(out: Path, run_dir: Path, name: str) -> None:
    """--out is a folder that is new, empty, or an earlier export of this same recipe of this run
    (one-line errors, before any work)."""
    if out.suffix.lower() in FILE_SUFFIXES:
        raise QuantbenchError(f"--out {out} looks like a file name; it names the folder the checkpoint is written "
                              f"into (e.g. --out {out.with_suffix('')})")
    if out.exists() and not out.is_dir():
        raise QuantbenchError(f"--out {out} is a file; give a folder")
    if not out.exists() or not any(out.iterdir()):
        return
    marker = read_json_or_none(out / MARKER)
    if marker is None:
        raise QuantbenchError(f"--out {out} exists and is not a quantbench export; choose a new or empty folder")
    was = (marker.get("recipe") or {}).get("name")
    same_run = Path(str(marker.get("run_dir", ""))).resolve() == Path(run_dir).resolve()
    if was != name or not same_run:
        raise QuantbenchError(f"--out {out} holds the export of recipe '{was}' of run {marker.get('run_dir')}; "
                              "choose another folder, or delete that one first")


def _install(stage: Path, out: Path) -> None:
    """The finished stage folder becomes `out`; an earlier export there is replaced only now."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.replace(out, old)
    os.replace(stage, out)
    shutil.rmtree(old, ignore_errors=True)


def _build(rc: RunContext, recipe: Recipe, fmt: str, out: Path) -> tuple[nn.Module, Plan, dict]:
    """(simulated model, plan, what was written); the file is written from the model as measured."""
    model = copy.deepcopy(rc.lm.model)
    plan = prepare(model, recipe)
    ctx = QuantContext(plan=plan, calib=rc.calib, arch=arch_or_none(model))
    _mitigate_checked(model, ctx, fmt)
    t0 = time.perf_counter()
    if fmt == "gguf":
        written = _write_gguf(rc, recipe, plan, model, out)
        if recipe.is_fp:
            from ..quant.gguf_model import simulate_gguf_

            simulate_gguf_(model, {}, "F16")
            sim = model
        else:
            sim = quantize(model, ctx)
    else:
        from .compressed import write_compressed

        sim = quantize(model, ctx)
        info = write_compressed(sim, plan, rc.lm.tokenizer, out)
        written = {"export_path": str(info.path), "export_file_mb": round(info.nbytes / 2**20, 2),
                   "export_ct_format": info.format, "export_ct_groups": json.dumps(info.groups),
                   "export_ct_ignore": len(info.ignore), "export_warnings": "; ".join(info.warnings) or None}
    written["export_write_s"] = round(time.perf_counter() - t0, 2)
    return sim.eval(), plan, written


def _write_llama_cpp(rc: RunContext, recipe: Recipe, model: nn.Module, path: Path) -> dict:
    """A llamacpp recipe: the model (tokenizer included) as F32/F16 GGUF, then llama.cpp's own quantizer."""
    from gguf import GGUFReader

    from ..quant.backends.llamacpp import LlamaCpp, llama_quantize
    from .gguf import write_gguf

    opts = LlamaCpp.Options.model_validate(recipe.backend_options)
    src = path.with_name(f".{path.stem}-{opts.source}.gguf")
    try:
        info = write_gguf(model, rc.lm.tokenizer, src, default_qtype=opts.source)
        llama_quantize(src, path, opts.ftype, torch.get_num_threads())
    finally:
        src.unlink(missing_ok=True)
    types = Counter(t.tensor_type.name for t in GGUFReader(path).tensors)
    return {"export_path": str(path), "export_file_mb": round(path.stat().st_size / 2**20, 2),
            "export_gguf_file_type": f"MOSTLY_{opts.ftype}", "export_gguf_types": json.dumps(dict(types)),
            "export_warnings": "; ".join(info.warnings) or None}


def _write_gguf(rc: RunContext, recipe: Recipe, plan: Plan, model: nn.Module, out: Path) -> dict:
    from ..quant.backends.gguf import Gguf, gguf_types
    from .gguf import write_gguf

    path = out / f"{recipe.name}.gguf"
    if recipe.backend == "llamacpp":
        return _write_llama_cpp(rc, recipe, model, path)
    if recipe.is_fp:
        types, default = {}, "F16"
    else:
        opts = Gguf.Options.model_validate(recipe.backend_options)
        types, default = gguf_types(model, plan.backends()["gguf"], opts.qtype, opts.output_qtype), "F16"
    info = write_gguf(model, rc.lm.tokenizer, path, types, default_qtype=default)
    return {"export_path": str(info.path), "export_file_mb": round(info.nbytes / 2**20, 2),
            "export_gguf_file_type": info.file_type, "export_gguf_types": json.dumps(info.tensor_types),
            "export_warnings": "; ".join(info.warnings) or None}


def _reload(rc: RunContext, sim: nn.Module, fmt: str, path: Path) -> tuple[nn.Module, dict]:
    dtype = next(sim.parameters()).dtype
    attn = getattr(sim.config, "_attn_implementation", None)
    t0 = time.perf_counter()
    if fmt == "gguf":
        reloaded, tok = reload_gguf(path, dtype, attn, rc.device)
        text = rc.lm.tokenizer.decode(rc.windows.input_ids[0, 1:].tolist())
        extra = {"export_tokenizer_match": tokenizer_matches(rc.lm.tokenizer, tok, text),
                 "export_reload": "transformers GGUF loader (from_pretrained(folder, gguf_file=...), dequantized)"}
    else:
        reloaded = reload_compressed(path, dtype, attn, rc.device)
        quantized = getattr(reloaded.config, "quantization_config", None) is not None
        how = ("transformers + compressed-tensors (from_pretrained(folder)): weights decompressed, activations "
               "fake-quantized by compressed-tensors' forward")
        if packed_asymmetric(path):
            how = ("transformers + compressed-tensors, CompressedTensorsConfig(dequantize=True) (asymmetric packed "
                   "zero points do not load through the default route in transformers 5.24)")
        extra = {"export_reload": how if quantized else "transformers (from_pretrained(folder)), dense"}
        extra.update(kv_cache_check(path, sim, reloaded))
        why = dense_only(path, dtype)  # NVFP4 / MX outside bfloat16: one line saying so
        if why:
            extra["export_reload"] = why + ("; the stored tensors are verified instead" if stored_only(path) else "")
    extra.update(export_load_s=round(time.perf_counter() - t0, 2), export_load_mb=round(model_mb(reloaded), 1))
    return reloaded, extra


def _stored_proof(sim: nn.Module, fmt: str, path: Path) -> dict | None:
    """Where transformers cannot run the checkpoint as measured on this machine (verify.dense_only and
    stored_only: NVFP4 / MX in a float32 model), the proof is the stored tensors: each quantized linear
    decompressed by compressed-tensors equals the simulated weight, and every other tensor the file's."""
    dtype = next(sim.parameters()).dtype
    if fmt == "gguf" or not dense_only(path, dtype) or not stored_only(path):
        return None
    check = compare_stored(path, sim)
    return {"export_verified": check.ok, "export_verified_by": "stored tensors (compressed-tensors' decompression)",
            "export_stored_equal": f"{check.equal}/{check.compared}",
            "export_weights_mismatch": ", ".join(check.mismatched[:3]) or None}


@torch.no_grad()
def _verify(rc: RunContext, sim: nn.Module, reloaded: nn.Module) -> dict:
    e = rc.cfg.eval
    weights = compare_weights(sim, reloaded)
    sim_eval, _ = evaluate_lm(sim, rc.windows, e.batch_size, rc.device)
    tee = Tee(reloaded, sim)
    re_eval, _ = evaluate_lm(tee, rc.windows, e.batch_size, rc.device)
    delta = re_eval.ppl / sim_eval.ppl - 1
    secs = max(re_eval.seconds - tee.reference_seconds, 1e-9)
    return {"export_verified": weights.ok and abs(delta) <= VERIFY_PPL_TOL, "export_verified_by": "reload",
            "export_weights_equal": f"{weights.equal}/{weights.compared}" + (f" (missing {len(weights.missing)})"
                                                                               if weights.missing else ""),
            "export_weights_mismatch": ", ".join(weights.mismatched[:3]) or None,
            "export_ppl": re_eval.ppl, "export_sim_ppl": sim_eval.ppl, "export_ppl_delta_pct": 100 * delta,
            "export_logit_maxdiff": tee.max_abs_diff, "export_tok_s": round(rc.windows.input_ids.numel() / secs, 1)}


def check_request(run_dir: Path, name: str, fmt: str | None, out: Path | None = None) -> None:
    """The recipe and format of an export request, checked from the run directory before any model is
    loaded (one-line errors: unknown recipe, a format that cannot express it, an --out that is not a new
    folder or an earlier export of the same recipe)."""
    from .context import read_run, run_recipe

    recipe = run_recipe(run_dir, read_run(run_dir)[0], name)
    check_recipe(recipe, export_format(recipe, fmt))
    if out is not None:
        check_out(Path(out), run_dir, name)


def export_recipe(rc: RunContext, name: str, out: str | Path, fmt: str | None = None) -> dict:
    """Export recipe `name` of the run to `out` and prove it; returns the row's export columns."""
    recipe = rc.recipe(name)
    fmt = export_format(recipe, fmt)
    check_recipe(recipe, fmt)
    out = Path(out)
    check_out(out, rc.run_dir, name)
    stage = out.parent / f".{out.name}.partial-{os.getpid()}"  # written and proved here; `out` only when done
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        cols, plan = _export_into(rc, recipe, name, fmt, stage)
        cols = {k: v.replace(str(stage), str(out)) if isinstance(v, str) else v for k, v in cols.items()}
        (stage / MARKER).write_text(json.dumps({"run_dir": str(rc.run_dir), "recipe": recipe.model_dump(mode="json"),
                                                "plan": plan.to_json(), **cols}, indent=2, default=str))
        _install(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)  # a refusal or a failure leaves no half-written folder
    return cols


def _export_into(rc: RunContext, recipe: Recipe, name: str, fmt: str, out: Path) -> tuple[dict, Plan]:
    """Write, reload and prove the export in `out`: its columns and the plan it was written from."""
    t0 = time.perf_counter()
    log(f"export {name} ({fmt}): re-applying the recipe as measured")
    try:
        sim, plan, cols = _build(rc, recipe, fmt, out)
    except BackendUnavailable as err:
        raise QuantbenchError(f"recipe '{name}' cannot run here: {err}") from None
    log(f"export {name}: written ({cols['export_file_mb']} MB, in a stage folder until proved); reloading")
    reloaded, load = _reload(rc, sim, fmt, Path(cols["export_path"]))
    cols = {"export_format": fmt, **cols, **load, **_verify(rc, sim, reloaded)}
    cols.update(_stored_proof(sim, fmt, Path(cols["export_path"])) or {})
    cols.update(row_check(rc.run_dir, name, cols["export_sim_ppl"]))
    cols["export_runtime"] = "transformers (CPU)" if rc.device.type == "cpu" else f"transformers ({rc.device.type})"
    if fmt == "gguf":
        cols.update(llama_cpp_eval(Path(cols["export_path"]), rc.windows))
    else:
        cols.update(vllm_eval(Path(cols["export_path"]), rc.windows))
        cols.update(torchao_eval(sim, rc.windows, rc.cfg.eval.batch_size, rc.device))
    cols["export_s"] = round(time.perf_counter() - t0, 1)
    return cols, plan


def summary(name: str, c: dict) -> str:
    """One line per export for the terminal."""
    return (f"{name}: {c['export_format']} -> {c['export_path']}; export_verified {str(c['export_verified']).lower()} "
            f"(weights equal {c['export_weights_equal']}, ppl reloaded {c['export_ppl']:.4f} vs simulated "
            f"{c['export_sim_ppl']:.4f} ({c['export_ppl_delta_pct']:+.3f}%), max|Δlogit| {c['export_logit_maxdiff']:.3g}); "
            f"file {c['export_file_mb']} MB, load {c['export_load_s']} s, {c['export_tok_s']} tok/s")


def export_list(rc: RunContext, names: tuple[str, ...] | list[str]) -> None:
    """The run config's `export:` list, after the sweep (the run's own model, windows and calibration):
    each into <run_dir>/export/<name>/. A refusal is logged in one line and the others go on; an export
    already verified for the same measured row (a resumed run) is kept."""
    from .record import load_run_rows, record_export
    from .refuse import ExportRefused

    rows = load_run_rows(rc.run_dir)
    for name in names:
        out = rc.run_dir / "export" / name
        if rows.get(name, {}).get("export_verified") is True and (out / MARKER).exists():
            log(f"export {name}: already exported and verified ({out})")
            continue
        try:
            cols = export_recipe(rc, name, out)
        except ExportRefused as err:
            log(f"export {name}: refused: {err}")
            continue
        log(summary(name, record_export(rc.run_dir, rc.cfg, name, cols)))


__all__ = ["check_request", "export_recipe", "export_list", "summary", "MARKER"]
