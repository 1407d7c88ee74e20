"""Quantization specs and recipes as data (frozen pydantic models that round-trip to YAML).

A Recipe says what is quantized, how, after which mitigations and by which backend; `overrides`
replace those specs for the linears whose names match (exact, dotted suffix, glob, or `re:` regex),
which is how per-layer (mixed) plans are written. Mitigation and backend options are typed: each
plugin declares an `Options` model, and the recipe is validated against it when the config is read.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..core.registry import Registry, UnknownName

Granularity = Literal["tensor", "channel", "token", "group"]

# Plugin registries (filled by the modules of quant/mitigations and quant/backends on first use).
MITIGATIONS: Registry = Registry("mitigation", "quantbench.quant.mitigations")
BACKENDS: Registry = Registry("backend", "quantbench.quant.backends")


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class QuantSpec(_Frozen):
    """How one tensor kind (weights, activations or KV) is quantized.

    granularity: tensor (one scale), channel (one per output row of a weight), token (one per
    activation row, i.e. per token), group (one per `group_size` consecutive input elements).
    """

    bits: int = Field(8, ge=2, le=8)
    format: Literal["int", "fp8"] = "int"
    symmetric: bool = True
    granularity: Granularity = "channel"
    group_size: int | None = Field(None, ge=8)
    dynamic: bool = True  # activations only: per-batch ranges (True) or calibrated ranges (False)
    clip_ratio: float = Field(1.0, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _check(self) -> "QuantSpec":
        if self.granularity == "group" and self.group_size is None:
            raise ValueError("granularity 'group' needs group_size")
        if self.granularity != "group" and self.group_size is not None:
            raise ValueError("group_size is only used with granularity 'group'")
        if self.format == "fp8" and self.bits != 8:
            raise ValueError("format fp8 means 8 bits (e4m3)")
        return self

    def short(self) -> str:
        """e.g. 'int4/g64/sym', 'fp8/token/dyn'."""
        g = f"g{self.group_size}" if self.granularity == "group" else self.granularity
        kind = "fp8" if self.format == "fp8" else f"int{self.bits}"
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

    @field_validator("exclude")
    @classmethod
    def _patterns(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(check_pattern(p) for p in v)

    @model_validator(mode="after")
    def _check(self) -> "Recipe":
        for w, a, kv in [(self.weights, self.activations, self.kv),
                         *[(o.weights, o.activations, o.kv) for o in self.overrides]]:
            check_specs(w, a, kv)
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
