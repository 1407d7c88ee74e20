"""What each export format can express, and one-line refusals that name the cause and the closest
exportable recipe.

compressed-tensors: simulated recipes whose linears hold int (2-8 bit) or fp8 weights per tensor,
channel or group, fp8 weights in 128x128 blocks, or NVFP4 / MXFP4 / MXFP8 weights, with no activation
quantization, or dynamic per-token / per-tensor activations, or static per-tensor activations, or fp8
1x128 / microscaling activation groups (dynamic; NVFP4's under its calibrated global scale); weight-only mitigations (SmoothQuant, AWQ, clipping, GPTQ, rotation
folded into the weights) export as plain quantized weights. It cannot express online transforms
(rotate's Hadamard before down_proj), inputs kept in high precision (outlier_tokens, int8_decomp),
our KV-cache quantization other than static fp8 scales on the cache as stored (`kv_at: cache`, per tensor or
per kv head: written as `kv_cache_scheme`, vLLM's fp8 kv cache), grouped int activations, int block weights, or other backends' kernels.
gguf: `gguf` backend recipes (llama.cpp block types), `llamacpp` recipes (llama.cpp's own quantizer on an
F32/F16 file) and `fp` (F16), same mitigation rules.
"""
from __future__ import annotations

import yaml

from ..core.errors import QuantbenchError
from ..core.registry import suggest
from ..quant.recipes import PRESETS
from ..quant.spec import MitigationSpec, Recipe
from .compressed import exports_kv_cache

FORMATS = ("compressed-tensors", "gguf")


class ExportRefused(QuantbenchError):
    """The recipe cannot be written in the requested format (one line: why, and what can)."""


def export_format(recipe: Recipe, fmt: str | None) -> str:
    """The format to write: the one asked for, else gguf for gguf-backend recipes, else compressed-tensors."""
    if fmt is None:
        return "gguf" if _backends(recipe) in ({"gguf"}, {"llamacpp"}) else "compressed-tensors"
    if fmt not in FORMATS:
        raise QuantbenchError(f"unknown export format '{fmt}'{suggest(fmt, list(FORMATS))} (known: {', '.join(FORMATS)})")
    return fmt


def _backends(recipe: Recipe) -> set[str]:
    return {recipe.backend, *[o.backend for o in recipe.overrides if o.backend]}


def _same(a: Recipe, b: Recipe) -> bool:
    drop = lambda r: {k: v for k, v in r.model_dump(mode="json").items() if k != "name"}  # noqa: E731
    return drop(a) == drop(b)


def describe(candidate: Recipe, base: Recipe) -> str:
    """A preset equal to `candidate`, else a one-line YAML entry for a run config."""
    for name in PRESETS:
        if _same(PRESETS.get(name), candidate):
            return f"preset '{name}'"
    if base.name in PRESETS:
        diff = {k: v for k, v in candidate.model_dump(mode="json", exclude_defaults=True).items()
                if k != "name" and v != PRESETS.get(base.name).model_dump(mode="json").get(k)}
        entry = {"preset": base.name, "name": candidate.name, **diff}
    else:
        entry = candidate.model_dump(mode="json", exclude_defaults=True)
    return yaml.safe_dump(entry, default_flow_style=True, width=10_000, sort_keys=False).strip()


def closest_without(recipe: Recipe, mitigation: str) -> str:
    """The recipe with `mitigation` made exportable: rotate without its online part, others dropped."""
    if mitigation == "rotate":
        mits = tuple(MitigationSpec(name="rotate", options={**m.options, "down": False}) if m.name == "rotate" else m
                     for m in recipe.mitigations)
        cand = recipe.model_copy(update={"mitigations": mits, "name": f"{recipe.name}-nodown"})
    else:
        cand = recipe.model_copy(update={"mitigations": tuple(m for m in recipe.mitigations if m.name != mitigation),
                                         "name": f"{recipe.name}-no-{mitigation.replace('_', '-')}"})
    return describe(cand, recipe)


def check_recipe(recipe: Recipe, fmt: str) -> None:
    """Refuse, before any work, what `fmt` cannot hold whatever the mitigations do."""
    r, backends = recipe, _backends(recipe)
    if fmt == "gguf":
        if r.is_fp or backends in ({"gguf"}, {"llamacpp"}):
            return
        bits = r.weights.bits if r.weights else 16
        hint = "gguf-q8_0" if bits >= 8 else "gguf-q4_0"
        raise ExportRefused(f"recipe '{r.name}' is not a llama.cpp type (backend {r.backend}); --format gguf writes "
                            f"gguf-* recipes and fp; export this one with --format compressed-tensors, or run "
                            f"preset '{hint}'")
    if backends & {"gguf", "llamacpp"}:
        raise ExportRefused(f"recipe '{r.name}' uses llama.cpp block types, which compressed-tensors cannot hold; "
                            "use --format gguf")
    if backends != {"simulated"}:
        sim = r.model_copy(update={"backend": "simulated", "backend_options": {},
                                   "overrides": tuple(o.model_copy(update={"backend": None}) for o in r.overrides),
                                   "name": f"{r.name}-simulated"})
        raise ExportRefused(f"recipe '{r.name}' runs on the {'/'.join(sorted(backends - {'simulated'}))} backend's "
                            f"own kernels; compressed-tensors exports simulated recipes; closest exportable: "
                            f"{describe(sim, r)}")
    blocks = [w for w in (r.weights, *[o.weights for o in r.overrides]) if w is not None and w.granularity == "block"
              and w.format != "fp8"]
    if blocks:
        raise ExportRefused(f"recipe '{r.name}': {blocks[0].short()} weights have no compressed-tensors format that "
                            "vLLM runs (block weights are fp8 there: preset 'fp8-block'; int: use group weights)")
    specs = [(r.activations, r.kv), *[(o.activations, o.kv) for o in r.overrides]]
    if any(kv is not None for _, kv in specs) and not exports_kv_cache(r):
        cand = r.model_copy(update={"kv": None, "overrides": tuple(o.model_copy(update={"kv": None}) for o in r.overrides),
                                    "name": f"{r.name}-nokv"})
        raise ExportRefused(f"recipe '{r.name}': this KV-cache quantization has no compressed-tensors form that vLLM "
                            f"runs (its kv_cache_scheme is static fp8 per tensor or per kv head on the cache as stored: "
                            f"preset 'w8a8-fp8-kv8'); closest exportable: "
                            f"{describe(cand, r)}")
    if any(a is not None and a.granularity == "group" and a.format == "int" for a, _ in specs):
        raise ExportRefused(f"recipe '{r.name}': grouped int activation quantization is not exportable "
                            "(use per-token or per-tensor activations; fp8 1x128 groups and the microscaling formats "
                            "are)")


def check_effects(recipe: Recipe, mitigation: str, online: list[str], keep: dict[str, str], fmt: str) -> None:
    """Refuse when the mitigation just applied declared what `fmt` cannot express."""
    if online:
        raise ExportRefused(f"recipe '{recipe.name}': {mitigation} inserts an online transform before "
                            f"{len(online)} linear input(s) (e.g. {online[0]}), which {fmt} cannot express; "
                            f"closest exportable: {closest_without(recipe, mitigation)}")
    if keep:
        first, kinds = next(iter(keep.items()))
        raise ExportRefused(f"recipe '{recipe.name}': {mitigation} keeps {kinds} of {len(keep)} linear input(s) in high "
                            f"precision (e.g. {first}), which {fmt} cannot express; closest exportable: "
                            f"{closest_without(recipe, mitigation)}")
