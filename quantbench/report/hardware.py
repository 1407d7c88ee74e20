"""Where a recipe's checkpoint runs, read from the recipe's content (formats, bits, activations, KV, mitigations,
backend), never from its name: the table's `hardware` column and `recommend --target` use the same `needs()`.

A recipe runs on a target when a runtime it exports to executes it there with the numerics we measured: vLLM for
compressed-tensors recipes, llama.cpp for GGUF types, the backend's own library for bitsandbytes / optimum-quanto.
What has no such runtime (int W4A4, KV-cache quantization, online Hadamard transforms, inputs kept in high
precision: what quantbench/export/refuse.py refuses) is "simulated only" and runs on no target.

Sources (vLLM): FP8 W8A8 needs compute capability >= 8.9; FP8 weight-only runs from 7.5 through FP8 Marlin
(docs.vllm.ai/en/stable/features/quantization/fp8/); INT8 W8A8 on Turing (SM 7.5) and later and on x86 CPUs,
Marlin int4/int8 weight-only on Ampere (SM 8.0) and later, bitsandbytes and GGUF on Volta (SM 7.0) and later
(docs.vllm.ai/en/v0.9.2/features/quantization/supported_hardware.html); NVFP4 / MXFP4 weight-only through FP4
Marlin from SM 8.0 (compressed-tensors schemes W4A16Fp4 / W4A16Mxfp4, min capability 80); native FP4 W4A4 GEMMs:
NVFP4 on SM100 and SM120 (CUTLASS nvfp4_scaled_mm sm100/sm120 kernels), MXFP4 only on SM100 (SM120 falls back to
weight-only Marlin: vllm-project/vllm issue 31085); int4 weights x FP8 activations only on SM90 (CutlassW4A8
kernel: "requires compute capability of 90 (Hopper)"); MXFP8 on SM100 (Blackwell data centre).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..core.errors import QuantbenchError
from ..core.registry import suggest
from ..quant.spec import MITIGATIONS, QuantSpec, Recipe

GENERATIONS = {70: "Volta", 75: "Turing", 80: "Ampere", 89: "Ada", 90: "Hopper", 100: "Blackwell", 120: "Blackwell"}


@dataclass(frozen=True)
class Target:
    """A device a user deploys on: an NVIDIA GPU (`sm`: compute capability x 10) or a host (`cpu`, `apple`)."""

    name: str
    what: str
    sm: int | None = None
    host: str | None = None


@dataclass(frozen=True)
class Needs:
    """What a recipe's runtime needs. min_sm: lowest compute capability x 10 (None: no NVIDIA GPU); families:
    only these SM major versions (9 = Hopper, 10 = B200/GB200/B300, 12 = RTX 50xx), () = every one from min_sm;
    hosts: the non-GPU targets it runs on; runtime: what runs it (shown in the label)."""

    runtime: str
    min_sm: int | None = None
    families: tuple[int, ...] = ()
    hosts: tuple[str, ...] = ()

    def runs_on(self, t: Target) -> bool:
        if t.sm is None:
            return t.host in self.hosts
        return self.min_sm is not None and t.sm >= self.min_sm and (not self.families or t.sm // 10 in self.families)

    @property
    def label(self) -> str:
        if not self.runtime:
            return "simulated only"
        if self == ANY:
            return "any"
        gpu = [] if self.min_sm is None else (
            ["/".join(f"SM{f * 10}" for f in self.families)] if self.families
            else [f"SM{self.min_sm}+ ({GENERATIONS.get(self.min_sm, '?')}+)"])
        hosts = [{"cpu": "x86 CPU", "apple": "Apple"}[h] for h in self.hosts]
        return f"{self.runtime}: {', '.join(gpu + hosts)}"


TARGETS = {t.name: t for t in (
    Target("cpu", "x86 CPU", host="cpu"),
    Target("apple", "Apple silicon: CPU or Metal", host="apple"),
    Target("mps", "Apple silicon: CPU or Metal", host="apple"),
    Target("t4", "NVIDIA T4, SM75", 75),
    Target("a100", "NVIDIA A100, SM80", 80),
    Target("a10", "NVIDIA A10, SM86", 86),
    Target("rtx3090", "NVIDIA RTX 3090, SM86", 86),
    Target("l4", "NVIDIA L4, SM89", 89),
    Target("l40s", "NVIDIA L40S, SM89", 89),
    Target("rtx4090", "NVIDIA RTX 4090, SM89", 89),
    Target("h100", "NVIDIA H100, SM90", 90),
    Target("h200", "NVIDIA H200, SM90", 90),
    Target("gh200", "NVIDIA GH200, SM90", 90),
    Target("b200", "NVIDIA B200, SM100", 100),
    Target("gb200", "NVIDIA GB200, SM100", 100),
    Target("b300", "NVIDIA B300, SM103", 103),
    Target("rtx5090", "NVIDIA RTX 5090, SM120", 120),
    Target("rtx-pro-6000", "NVIDIA RTX PRO 6000 Blackwell, SM120", 120),
)}

ANY = Needs("any", 70, hosts=("cpu", "apple"))
SIMULATED = Needs("")
VLLM = "vLLM"
LLAMA_CPP = Needs("llama.cpp", 70, hosts=("cpu", "apple"))
BACKENDS = {"gguf": LLAMA_CPP, "llamacpp": LLAMA_CPP, "quanto": Needs("optimum-quanto", 70, hosts=("cpu", "apple")),
            "bnb-int8": Needs("bitsandbytes", 70, hosts=("cpu",)), "bnb-nf4": Needs("bitsandbytes", 70, hosts=("cpu",)),
            "bnb-fp4": Needs("bitsandbytes", 70, hosts=("cpu",))}
# vLLM kernels by (weights format, activations format or None); bits are checked in _vllm
KERNELS = {
    ("int", None): Needs(VLLM, 80),  # Marlin, 4 or 8 bits
    ("int", "int"): Needs(VLLM, 75, hosts=("cpu",)),  # INT8 W8A8 (CUTLASS; x86 CPU)
    ("int", "fp8"): Needs(VLLM, 90, families=(9,)),  # CUTLASS W4A8 (int4 x fp8), Hopper only
    ("fp8", None): Needs(VLLM, 75),  # FP8 Marlin
    ("fp8", "fp8"): Needs(VLLM, 89),
    ("nvfp4", None): Needs(VLLM, 80),  # FP4 Marlin
    ("mxfp4", None): Needs(VLLM, 80),  # FP4 Marlin
    ("nvfp4", "nvfp4"): Needs(VLLM, 100, families=(10, 12)),
    ("mxfp4", "mxfp4"): Needs(VLLM, 100, families=(10,)),
    ("mxfp8", None): Needs(VLLM, 100, families=(10,)),
    ("mxfp8", "mxfp8"): Needs(VLLM, 100, families=(10,)),
}
KEEPS_INPUTS = ("outlier_tokens", "int8_decomp")  # inputs kept in high precision: no exported form
ONLINE = {"rotate": ("down", "o_online")}  # options that insert an online transform before a linear


def _vllm(w: QuantSpec | None, a: QuantSpec | None) -> Needs:
    """The vLLM kernel of one (weights, activations) pair, SIMULATED where none exists."""
    if w is None:
        return SIMULATED if a is not None else ANY
    k = KERNELS.get((w.format, a.format if a is not None else None), SIMULATED)
    if w.format == "int" and (w.granularity == "block" or (a is not None and a.granularity == "group")):
        return SIMULATED
    if (w.format, a and a.format) == ("int", "int"):
        return k if w.bits == a.bits == 8 else SIMULATED  # INT8 W8A8 only (no int W4A8 / W4A4 GPU kernel)
    if (w.format, a and a.format) == ("int", "fp8"):
        return k if w.bits == 4 else SIMULATED
    return k if w.format != "int" or w.bits in (4, 8) else SIMULATED


def _online(recipe: Recipe) -> bool:
    """A mitigation that leaves work at inference time no exported checkpoint holds."""
    for m in recipe.mitigations:
        if m.name in KEEPS_INPUTS:
            return True
        if m.name in ONLINE:
            opts = MITIGATIONS.get(m.name).Options.model_validate(m.options)
            if any(getattr(opts, o) for o in ONLINE[m.name]):
                return True
    return False


def _both(a: Needs, b: Needs) -> Needs:
    """What runs both: the stricter GPU need, the shared hosts (layers of one model need one device)."""
    if a == b or b == ANY:
        return a
    if a == ANY:
        return b
    if SIMULATED in (a, b) or a.runtime != b.runtime:
        return SIMULATED
    sm = max(a.min_sm, b.min_sm) if a.min_sm is not None and b.min_sm is not None else None
    fam = tuple(f for f in (a.families or b.families) if not b.families or f in b.families)
    fam = tuple(f for f in fam if sm is None or (f + 1) * 10 > sm)  # a family can still reach min_sm
    if (a.families or b.families) and not fam:
        sm = None
    hosts = tuple(h for h in a.hosts if h in b.hosts)
    return Needs(a.runtime, sm, fam, hosts) if sm is not None or hosts else SIMULATED


def needs(recipe: Recipe) -> Needs:
    """Where `recipe` runs, from its content: fp anywhere; gguf / llamacpp / bnb / quanto where their library runs;
    simulated recipes where a vLLM kernel serves every (weights, activations) pair of it and its overrides."""
    if recipe.is_fp:
        return ANY
    if any(kv is not None for kv in (recipe.kv, *[o.kv for o in recipe.overrides])) or _online(recipe):
        return SIMULATED
    backends = {recipe.backend, *[o.backend for o in recipe.overrides if o.backend]}
    if backends != {"simulated"}:
        found = {BACKENDS.get(b, SIMULATED) for b in backends}
        return found.pop() if len(found) == 1 else SIMULATED
    out = _vllm(recipe.weights, recipe.activations)
    for o in recipe.overrides:
        fields = o.replaces()
        w = o.weights if "weights" in fields else recipe.weights
        a = o.activations if "activations" in fields else recipe.activations
        out = _both(out, _vllm(w, a))
    return out


def hardware(recipe: Recipe) -> str:
    """The table's `hardware` cell: where the recipe's checkpoint runs (see needs())."""
    return needs(recipe).label


def recipe_needs(name: str, recipes: dict[str, Recipe] | None = None) -> Needs | None:
    """needs() of the run's recipe `name` (its spec from the run's config), else of the preset of that name;
    None when neither is known."""
    from ..quant.recipes import PRESETS

    spec = (recipes or {}).get(name) or (PRESETS.get(name) if name in PRESETS else None)
    return needs(spec) if spec is not None else None


def hardware_by_name(name: str, recipes: dict[str, Recipe] | None = None) -> str | None:
    """hardware() of a run's recipe or a preset by name; None when unknown."""
    n = recipe_needs(name, recipes)
    return n.label if n is not None else None


def target(name: str) -> Target:
    """The target called `name` (case-insensitive); a one-line error with the closest name otherwise."""
    key = name.strip().lower()
    if key not in TARGETS:
        raise QuantbenchError(f"unknown target '{name}'{suggest(key, list(TARGETS))} (known: {', '.join(TARGETS)})")
    return TARGETS[key]


def targets_for(n: Needs) -> list[str]:
    """Names of the known targets that run what `n` describes."""
    return [t.name for t in TARGETS.values() if n.runs_on(t)]
