"""A recipe resolved once against a model: the per-linear plan.

    plan.linears[name] = LinearPlan(weights, activations, kv, backend)

Every linear of the model that the recipe quantizes gets an entry (excluded ones are listed
apart); `overrides` are applied in order, later ones win. Simulation, real backends, size
accounting, export and the report all read the plan, and it is written next to the results
(`plans/<recipe>.json`) so a reader sees exactly what was quantized how.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import torch.nn as nn

from ..core.errors import QuantbenchError
from ..modeling.arch import ArchSpec, arch_or_none
from ..modeling.surgery import in_features, linear_modules, matches
from .spec import QuantSpec, Recipe


@dataclass(frozen=True)
class LinearPlan:
    """What happens to one linear: its weight and input-activation quantizers, the quantizer of its
    output when that output is KV-cache content (k/v projections), and the backend that runs it."""

    name: str
    weights: QuantSpec | None
    activations: QuantSpec | None
    kv: QuantSpec | None
    backend: str

    @property
    def quantized(self) -> bool:
        return self.weights is not None or self.activations is not None or self.kv is not None


@dataclass
class Plan:
    recipe: Recipe
    linears: dict[str, LinearPlan]
    excluded: list[str] = field(default_factory=list)

    def backends(self) -> dict[str, list[str]]:
        """backend -> the names of the quantized linears it runs (in model order)."""
        out: dict[str, list[str]] = {}
        for name, lp in self.linears.items():
            if lp.quantized:
                out.setdefault(lp.backend, []).append(name)
        return out

    @property
    def mode(self) -> str:
        """'fp' when nothing is quantized, else the backend(s) that run the plan ('simulated', 'quanto', ...)."""
        backends = sorted(self.backends())
        return "+".join(backends) if backends else "fp"

    def weight_specs(self) -> dict[str, QuantSpec]:
        return {n: lp.weights for n, lp in self.linears.items() if lp.weights is not None}

    def to_json(self) -> dict:
        def spec(s: QuantSpec | None):
            return None if s is None else s.model_dump(mode="json", exclude_defaults=True) | {"bits": s.bits}

        return {"recipe": self.recipe.name, "excluded": self.excluded,
                "linears": {n: {"weights": spec(lp.weights), "activations": spec(lp.activations),
                                "kv": spec(lp.kv), "backend": lp.backend} for n, lp in self.linears.items()}}

    def summary(self) -> dict[str, int]:
        """How many linears get each (weights, activations) pair, e.g. {'int4/g64/sym | fp': 203}."""
        counts: dict[str, int] = {}
        for lp in self.linears.values():
            key = f"{lp.weights.short() if lp.weights else 'fp'} | {lp.activations.short() if lp.activations else 'fp'}"
            counts[key] = counts.get(key, 0) + 1
        return counts

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1)


def kv_linears(model: nn.Module, arch: ArchSpec) -> list[str]:
    """Names of every layer's k and v projections: the linears the traced KV cache tensors come from
    (a layer whose k and v come out of one fused projection has none)."""
    return [arch.layer_path(i, p) for i, t in enumerate(arch.layer_topos) if len(t.kv) == 2 for p in t.kv]


def resolve_plan(model: nn.Module, recipe: Recipe) -> Plan:
    """The recipe's per-linear plan for this model (no checks beyond name matching; see check_plan).
    MoE routers (and gates such as Qwen2-MoE's shared_expert_gate) stay in high precision and are
    listed as excluded, unless an override names them."""
    arch = arch_or_none(model)
    kv_names = set(kv_linears(model, arch)) if (arch is not None and not arch.fused_qkv) else set()
    routers = set(arch.names("routers")) if arch is not None else set()
    linears, excluded = {}, []
    for name, _mod in linear_modules(model):
        router = name in routers and not any(matches(name, o.match) for o in recipe.overrides)
        if router or any(matches(name, p) for p in recipe.exclude):
            excluded.append(name)
            continue
        cur = {"weights": recipe.weights, "activations": recipe.activations,
               "kv": recipe.kv if name in kv_names and recipe.kv_at == "proj" else None, "backend": recipe.backend}
        for o in recipe.overrides:
            if matches(name, o.match):
                for f in o.replaces():
                    if f == "kv" and name not in kv_names:
                        continue
                    cur[f] = getattr(o, f) if f != "backend" or o.backend else recipe.backend
        linears[name] = LinearPlan(name, **cur)
    return Plan(recipe, linears, excluded)


def check_plan(model: nn.Module, plan: Plan) -> None:
    """Reject what no backend could run, before any work, naming the recipe and the layer."""
    r = plan.recipe
    for o in r.overrides:
        if not any(matches(n, o.match) for n in [*plan.linears, *plan.excluded]):
            raise QuantbenchError(f"recipe '{r.name}': override match '{o.match}' names no linear layer of "
                                  f"this model (e.g. {next(iter(plan.linears), 'none')})")
    wants_kv = r.kv is not None or any(o.kv is not None for o in r.overrides)
    if wants_kv and r.kv_at == "cache":
        _check_cache_kv(model, plan)
    elif wants_kv:
        _check_kv(model, plan)
    mods = dict(linear_modules(model))
    for name, lp in plan.linears.items():
        fan_in = in_features(mods[name])
        _check_formats(r.name, name, lp, fan_in)
        for spec, what in ((lp.weights, "weights"), (lp.activations, "activations")):
            if spec is not None and spec.granularity == "group" and fan_in % spec.group_size:
                raise QuantbenchError(
                    f"recipe '{r.name}': {what} group_size {spec.group_size} does not divide the input size "
                    f"{fan_in} of layer {name}; pick a divisor (e.g. {divisor_hint(fan_in, spec.group_size)})")


def _check_formats(recipe: str, name: str, lp: LinearPlan, fan_in: int) -> None:
    """Microscaling formats and block weights: simulated only; a microscaling group must divide the input
    (compressed-tensors refuses a partial group; a partial weight block is zero-padded, as there)."""
    for spec, what in ((lp.weights, "weights"), (lp.activations, "activations")):
        if spec is None or not (spec.micro or spec.granularity == "block"):
            continue
        if lp.backend != "simulated":
            raise QuantbenchError(f"recipe '{recipe}': {what} {spec.short()} run on the simulated backend only "
                                  f"(backend '{lp.backend}' for {name})")
        if spec.micro and fan_in % spec.group_size:
            raise QuantbenchError(f"recipe '{recipe}': {spec.format} scales groups of {spec.group_size} inputs, and "
                                  f"layer {name} has {fan_in} inputs (not a multiple); exclude it")


def _check_kv(model: nn.Module, plan: Plan) -> None:
    r = plan.recipe
    arch = arch_or_none(model)
    if arch is None:
        raise QuantbenchError(f"recipe '{r.name}': kv quantization needs to know the k/v projections, and "
                              f"architecture '{getattr(model.config, 'model_type', '?')}' is not described")
    if arch.fused_qkv:
        raise QuantbenchError(f"recipe '{r.name}': kv quantization needs separate k/v projections; "
                              f"{model.config.model_type} fuses q/k/v")
    names = kv_linears(model, arch)
    if not names:
        raise QuantbenchError(f"recipe '{r.name}': kv quantization needs the k/v projections, and the traced "
                              f"{arch.family} has none that are separate linears")
    for name in names:
        lp = plan.linears.get(name)
        if lp is None or lp.kv is None:
            continue
        if lp.backend != "simulated":
            raise QuantbenchError(f"recipe '{r.name}': kv quantization is simulated only (backend '{lp.backend}')")
        width = model.get_submodule(name).weight.shape[0]
        if lp.kv.granularity == "group" and width % lp.kv.group_size:
            raise QuantbenchError(f"recipe '{r.name}': kv group_size {lp.kv.group_size} does not divide the "
                                  f"k/v width {width} of {name} (use the head dimension)")


def _check_cache_kv(model: nn.Module, plan: Plan) -> None:
    from .kvcache import check_kv_cache

    r = plan.recipe
    if r.backend != "simulated":
        raise QuantbenchError(f"recipe '{r.name}': kv quantization is simulated only (backend '{r.backend}')")
    check_kv_cache(model, r.kv, r.name)


def divisor_hint(n: int, g: int) -> int:
    """The largest power-of-two divisor of n that is at most g (and at least 8), for error messages."""
    return max(d for d in range(8, min(n, g) + 1) if n % d == 0 and d & (d - 1) == 0) if n >= 8 else n


FUSED_SHARDS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # vLLM runs each set as one matmul


def fused_sets(names: list[str]) -> list[list[str]]:
    """`names` partitioned into the sets vLLM fuses into one matmul (a layer's q/k/v, its gate/up), which
    must share one scheme to load there; every other linear is a set of its own. Order follows `names`."""
    groups: dict = {}
    for n in names:
        head, _, leaf = n.rpartition(".")
        shard = next((i for i, s in enumerate(FUSED_SHARDS) if leaf in s), None)
        groups.setdefault((head, shard) if shard is not None else n, []).append(n)
    return list(groups.values())


__all__ = ["LinearPlan", "Plan", "resolve_plan", "check_plan", "kv_linears", "divisor_hint", "asdict", "FUSED_SHARDS",
           "fused_sets"]

