"""Which GPUs run a recipe's exported checkpoint natively in vLLM: one small data table, read at table time
from the recipe (never stored in rows).

Sources (vLLM documentation): FP8 W8A8 needs compute capability >= 8.9 (Ada, Hopper, Blackwell); FP8 weight-only
runs from 7.5 through FP8 Marlin (docs.vllm.ai/en/stable/features/quantization/fp8/); INT8 W8A8 runs on Turing
(SM 7.5) and later and on x86 CPUs, Marlin GPTQ/AWQ int4 weight-only on Ampere (SM 8.0) and later
(docs.vllm.ai/en/v0.9.2/features/quantization/supported_hardware.html); native FP4 (NVFP4, MXFP4) GEMMs only on
the SM100 family, other GPUs falling back to weight-only Marlin (vllm-project/vllm issue 31085, the
"Your GPU does not have native support for FP4 computation" warning).
"""
from __future__ import annotations

from ..quant.spec import Recipe

# (weights format, activations format or None) -> what vLLM needs to run it natively
HARDWARE = {
    ("int", None): "SM80+ (Ampere)",
    ("int", "int"): "SM75+ (Turing), x86 CPU",
    ("int", "fp8"): "SM89+ (Ada/Hopper)",
    ("fp8", None): "SM75+ (FP8 Marlin, W8A16)",
    ("fp8", "fp8"): "SM89+ (Ada/Hopper)",
    ("nvfp4", None): "SM100+ (Blackwell)",
    ("nvfp4", "nvfp4"): "SM100+ (Blackwell)",
    ("mxfp4", None): "SM100+ (Blackwell)",
    ("mxfp4", "mxfp4"): "SM100+ (Blackwell)",
    ("mxfp8", None): "SM100+ (Blackwell)",
    ("mxfp8", "mxfp8"): "SM100+ (Blackwell)",
}
CPU = "CPU (simulated / GGUF)"


def hardware(recipe: Recipe) -> str:
    """The hardware a recipe's checkpoint needs: the table's entry for its (weights, activations) formats;
    llama.cpp types run on CPU; fp anywhere; what has no entry (KV quantization, other kernels) is simulated."""
    if recipe.is_fp:
        return "any"
    if recipe.backend in ("gguf", "llamacpp"):
        return "CPU (llama.cpp)"
    w, a = recipe.weights, recipe.activations
    if recipe.backend != "simulated" or recipe.kv is not None or w is None:
        return CPU
    return HARDWARE.get((w.format, a.format if a is not None else None), CPU)


def hardware_by_name(name: str) -> str | None:
    """hardware() of a preset by its name; None for recipes that are not presets."""
    from ..quant.recipes import PRESETS

    return hardware(PRESETS.get(name)) if name in PRESETS else None
