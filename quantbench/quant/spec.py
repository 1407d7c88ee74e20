"""Quantization specs and recipes as data (frozen pydantic models that round-trip to YAML)."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Granularity = Literal["tensor", "channel", "token", "group"]


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


class MitigationSpec(_Frozen):
    """One outlier mitigation applied before quantization; `options` go to its module."""

    name: str
    options: dict[str, Any] = Field(default_factory=dict)


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

    @model_validator(mode="after")
    def _check(self) -> "Recipe":
        a = self.activations
        if a is not None:
            if a.granularity == "channel":
                raise ValueError("activations cannot be per-channel (the scale would not factor out of the matmul)")
            if not a.dynamic and a.granularity == "token":
                raise ValueError("static activations need granularity 'tensor' or 'group' (per-token ranges are dynamic by nature)")
        kv = self.kv
        if kv is not None and (not kv.dynamic or kv.granularity == "channel"):
            raise ValueError("kv quantization is dynamic, per 'tensor', 'token' (all heads of a token) or "
                             "'group' (group_size = head_dim: one scale per head and token)")
        if self.weights is not None and self.weights.granularity == "token":
            raise ValueError("weights cannot be per-token; use channel or group")
        return self

    @property
    def is_fp(self) -> bool:
        return self.weights is None and self.activations is None and self.kv is None and not self.mitigations

    def weight_bits(self) -> float:
        """Bits per weight including scale/zero overhead (fp16 scales) for quantized linears."""
        w = self.weights
        if w is None:
            return 16.0
        if w.granularity == "group":
            return w.bits + 16.0 / w.group_size * (1 if w.symmetric else 2)
        return float(w.bits)
