"""Quantization specs and recipes as data (frozen pydantic models that round-trip to YAML).

A Recipe says what is quantized, how, after which mitigations and by which backend; `overrides`
replace those specs for the linears whose names match (exact, dotted suffix, glob, or `re:` regex),
which is how per-layer (mixed) plans are written. Mitigation and backend options are typed: each
plugin declares an `Options` model, and the recipe is validated against it when the config is read.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer, model_validator

from ..core.registry import Registry, UnknownName

Granularity = Literal["tensor", "channel", "token", "group", "block"]
Format = Literal["int", "fp8", "nvfp4", "mxfp4", "mxfp8"]
# microscaling formats -> (element bits, elements per scale): fixed by the format (NVFP4: fp8-e4m3 scale per 16
# and an fp32 global scale; OCP MX: e8m0 exponent per 32), always symmetric and grouped along the input
MICRO_FORMATS = {"nvfp4": (4, 16), "mxfp4": (4, 32), "mxfp8": (8, 32)}

# Plugin registries (filled by the modules of quant/mitigations and quant/backends on first use).
MITIGATIONS: Registry = Registry("mitigation", "quantbench.quant.mitigations")
BACKENDS: Registry = Registry("backend", "quantbench.quant.backends")


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class QuantSpec(_Frozen):
    """How one tensor kind (weights, activations or KV) is quantized.

    granularity: tensor (one scale), channel (one per output row of a weight), token (one per
    activation row, i.e. per token), group (one per `group_size` consecutive input elements), block
    (weights: one per square `group_size` x `group_size` tile, DeepSeek-style fp8 128x128).
    format: int, fp8 (e4m3), or a microscaling format (nvfp4, mxfp4, mxfp8) whose bits, granularity and
    group size are fixed by the format and filled in when left out.
    """

    bits: int = Field(8, ge=2, le=8)
    format: Format = "int"
    symmetric: bool = True
    granularity: Granularity = "channel"
    group_size: int | None = Field(None, ge=8)
    dynamic: bool = True  # activations only: per-batch ranges (True) or calibrated ranges (False)
    clip_ratio: float = Field(1.0, gt=0.0, le=1.0)

    @model_validator(mode="before")
    @classmethod
    def _micro_defaults(cls, data: Any) -> Any:
        """A microscaling format fixes bits, granularity and group size: fill in what was left out."""
        if isinstance(data, dict) and data.get("format") in MICRO_FORMATS:
            bits, group = MICRO_FORMATS[data["format"]]
            data = {"bits": bits, "granularity": "group", "group_size": group, **data}
        return data

    @model_validator(mode="after")
    def _check(self) -> "QuantSpec":
        if self.granularity in ("group", "block") and self.group_size is None:
            raise ValueError(f"granularity '{self.granularity}' needs group_size"
                             + (" (the edge of the square weight blocks, e.g. 128)" if self.granularity == "block" else ""))
        if self.granularity not in ("group", "block") and self.group_size is not None:
            raise ValueError("group_size is only used with granularity 'group' (or 'block')")
        if self.format == "fp8" and self.bits != 8:
            raise ValueError("format fp8 means 8 bits (e4m3)")
        if self.format in MICRO_FORMATS:
            self._check_micro()
        return self

    def _check_micro(self) -> None:
        bits, group = MICRO_FORMATS[self.format]
        if (self.bits, self.granularity, self.group_size) != (bits, "group", group):
            raise ValueError(f"format {self.format} is {bits}-bit with one scale per {group} inputs: bits {bits}, "
                             f"granularity group, group_size {group} (or leave them out)")
        if not self.symmetric:
            raise ValueError(f"format {self.format} is symmetric only (compressed-tensors has no zero point for it)")
        if self.clip_ratio != 1.0:
            raise ValueError(f"format {self.format} has no clip_ratio (its scales are fixed by the format; "
                             "use the clip mitigation on weights)")

    @property
    def micro(self) -> bool:
        """A microscaling format (nvfp4, mxfp4, mxfp8)."""
        return self.format in MICRO_FORMATS

    @property
    def calibrated(self) -> bool:
        """Activations that need calibration batches: static ranges, or NVFP4's calibrated global scale."""
        return not self.dynamic or self.format == "nvfp4"

    def short(self) -> str:
        """e.g. 'int4/g64/sym', 'fp8/token/dyn', 'nvfp4/g16/sym', 'fp8/b128/sym'."""
        g = {"group": f"g{self.group_size}", "block": f"b{self.group_size}"}.get(self.granularity, self.granularity)
        kind = self.format if self.format != "int" else f"int{self.bits}"
        return f"{kind}/{g}/{'sym' if self.symmetric else 'asym'}" + ("" if self.dynamic else "/static")


def _check_options(registry: Registry, name: str, options: dict[str, Any], what: str) -> None:
    """Validate `options` against the plugin's Options model; one line naming the key."""
    plugin = registry.get(name)
    opts_cls = getattr(plugin, "Options", None)
    if opts_cls is None:
        return
    try:
        opts_cls.model_validate(options)
    except ValidationError as err:
        e = err.errors()[0]
        key = ".".join(str(p) for p in e["loc"]) or "options"
        if e["type"] == "extra_forbidden":
            from ..core.registry import suggest

            known = sorted(opts_cls.model_fields)
            msg = f"unknown option{suggest(str(e['loc'][-1]), known)} (known: {', '.join(known) or 'none'})"
        else:
            msg = e["msg"].removeprefix("Value error, ")
        raise ValueError(f"{what} '{name}' option {key}: {msg}") from None


class MitigationSpec(_Frozen):
    """One outlier mitigation applied before quantization; `options` are checked against its Options."""

    name: str
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _known(self) -> "MitigationSpec":
        _check_options(MITIGATIONS, self.name, self.options, "mitigation")
        return self


def check_pattern(pattern: str) -> str:
    """A module-name pattern whose 're:' regular expression compiles (ValueError otherwise)."""
    if pattern.startswith("re:"):
        import re

        try:
            re.compile(pattern[3:])
        except re.error as e:
            raise ValueError(f"{pattern!r} is not a valid regular expression ({e})") from None
    return pattern


class Override(_Frozen):
    """Replace specs for the linears whose names match `match` (exact, dotted suffix, glob, or
    're:<regex>'). A field left out keeps the recipe's value; `null` means full precision."""

    match: str
    weights: QuantSpec | None = None
    activations: QuantSpec | None = None
    kv: QuantSpec | None = None
    backend: str | None = None

    @field_validator("match")
    @classmethod
    def _pattern(cls, v: str) -> str:
        return check_pattern(v)

    def replaces(self) -> set[str]:
        """The fields this override sets (explicit nulls included)."""
        return set(self.model_fields_set) - {"match"}


class Recipe(_Frozen):
    """A named quantization recipe: what is quantized, how, after which mitigations, by what."""

    name: str
    weights: QuantSpec | None = None
    activations: QuantSpec | None = None
    kv: QuantSpec | None = None
    mitigations: tuple[MitigationSpec, ...] = ()
    backend: str = "simulated"
    backend_options: dict[str, Any] = Field(default_factory=dict)  # e.g. {threshold: 6.0} for bnb-int8
    exclude: tuple[str, ...] = ("lm_head",)
    overrides: tuple[Override, ...] = ()
    # where kv is quantized: 'proj' = the k/v projections' outputs (K before RoPE, whole prefill at once);
    # 'cache' = each KV cache entry as the engine stores it (K after RoPE; quant/kvcache.py)
    kv_at: Literal["proj", "cache"] = "proj"

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        """The default kv_at is left out, so recipes written before it keep their dump (and row keys)."""
        d = handler(self)
        if isinstance(d, dict) and d.get("kv_at") == "proj":
            d.pop("kv_at")
        return d

    @field_validator("exclude")
    @classmethod
    def _patterns(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(check_pattern(p) for p in v)

    @model_validator(mode="after")
    def _check(self) -> "Recipe":
        for w, a, kv in [(self.weights, self.activations, self.kv),
                         *[(o.weights, o.activations, o.kv) for o in self.overrides]]:
            check_specs(w, a, kv if self.kv_at == "proj" else None)
        if self.kv_at == "cache":
            _check_cache_kv(self)
        _check_mitigation_specs(self)
        for b in {self.backend, *[o.backend for o in self.overrides if o.backend]}:
            try:
                BACKENDS.get(b)
            except UnknownName as e:
                raise ValueError(str(e)) from None
        _check_options(BACKENDS, self.backend, self.backend_options, "backend")
        return self

    @property
    def is_fp(self) -> bool:
        return (self.weights is None and self.activations is None and self.kv is None and not self.mitigations
                and all(o.weights is None and o.activations is None and o.kv is None for o in self.overrides))


def _check_mitigation_specs(recipe: "Recipe") -> None:
    """Each mitigation's spec_issue (e.g. clip's per-block search has no 2-D weight blocks) on every
    (weights, activations) pair of the recipe and its overrides."""
    pairs = [(recipe.weights, recipe.activations), *[(o.weights, o.activations) for o in recipe.overrides]]
    for m in recipe.mitigations:
        issue_of = getattr(MITIGATIONS.get(m.name), "spec_issue", None)
        for w, a in pairs if issue_of is not None else ():
            issue = issue_of(w, a)
            if issue:
                raise ValueError(f"mitigation '{m.name}': {issue}")


def check_specs(w: QuantSpec | None, a: QuantSpec | None, kv: QuantSpec | None) -> None:
    """Combinations no format can serve (raised as ValueError: pydantic reports where)."""
    if a is not None:
        if a.granularity == "channel":
            raise ValueError("activations cannot be per-channel (the scale would not factor out of the matmul)")
        if not a.dynamic and a.granularity == "token":
            raise ValueError("static activations need granularity 'tensor' or 'group' (per-token ranges are dynamic by nature)")
    if kv is not None and kv.granularity == "tensor":
        raise ValueError("kv granularity 'tensor' is not supported: its dynamic range would span the whole sequence, "
                         "future tokens included, which no KV cache knows when it writes a token; use 'token' or "
                         "'group' (group_size = head_dim)")
    if kv is not None and (not kv.dynamic or kv.granularity == "channel"):
        raise ValueError("kv quantization is dynamic, per 'token' (all heads of a token) or "
                         "'group' (group_size = head_dim: one scale per head and token)")
    if w is not None and w.granularity == "token":
        raise ValueError("weights cannot be per-token; use channel or group")
    _check_formats(w, a, kv)


def _check_cache_kv(recipe: "Recipe") -> None:
    """kv_at cache: one spec for every layer's cache; int or fp8, per token / head / tensor (static per tensor
    or per head: calibrated scales, vLLM's fp8 kv cache)."""
    kv = recipe.kv
    if kv is None:
        raise ValueError("kv_at 'cache' needs a kv spec")
    if any("kv" in o.replaces() for o in recipe.overrides):
        raise ValueError("kv_at 'cache' takes one kv spec for every layer (overrides cannot set kv)")
    if kv.micro or kv.granularity in ("block", "channel"):
        raise ValueError("kv_at 'cache' quantizes int or fp8, per 'token', 'group' (group_size = head_dim) or 'tensor'")
    if not kv.dynamic and kv.granularity == "token":
        raise ValueError("static kv scales are per 'tensor' or per head ('group', group_size = head_dim)")
    if not any(x is not None for x in (recipe.weights, recipe.activations, *[o.weights for o in recipe.overrides],
                                       *[o.activations for o in recipe.overrides])):
        raise ValueError("kv_at 'cache' needs quantized linears too (weights or activations): KV-only recipes are not "
                         "supported yet")


def _check_formats(w: QuantSpec | None, a: QuantSpec | None, kv: QuantSpec | None) -> None:
    """Where the block granularity and the microscaling formats apply (one line each)."""
    if w is not None and w.granularity == "block" and w.format not in ("int", "fp8"):
        raise ValueError(f"granularity 'block' is for int and fp8 weights, not {w.format}")
    if a is not None and a.granularity == "block":
        raise ValueError("activations cannot be block-wise; use granularity group (1 x group_size per token, "
                         "as fp8-block's 1x128)")
    if a is not None and a.micro and not a.dynamic:
        raise ValueError(f"{a.format} activations are dynamic (a scale per {a.group_size} inputs of each token"
                         + (", under a calibrated global scale" if a.format == "nvfp4" else "") + "): set dynamic: true")
    if kv is not None and (kv.micro or kv.granularity == "block"):
        raise ValueError("kv quantization is int or fp8, per token or per head")
