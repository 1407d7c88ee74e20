"""Typed config of the retrofit experiment (`quantbench train --config configs/retrofit.yaml`; a
config with `experiment: retrofit`). Unknown keys and impossible values are one-line ConfigErrors."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ...quant.recipes import PRESETS
from ...run.config import validate
from ..config import RunNamed
from .grafts import GRAFTS
from .model import CONTROL

PENALTY = "+penalty"  # variant suffix: the base variant's graft, trained with the outlier penalty (see PenaltyConfig)


def split_variant(name: str) -> tuple[str, bool]:
    """'kv_bias+penalty' -> ('kv_bias', True); 'kv_bias' -> ('kv_bias', False). The base is what is grafted."""
    return (name.removesuffix(PENALTY), True) if name.endswith(PENALTY) else (name, False)


def variant_spec(name: str) -> tuple[str, dict[str, float], bool]:
    """'<graft>[@key=value,...][+penalty]' -> (graft, grafts.* overrides, penalized), e.g.
    'kv_bias@sink_logit_init=-10' -> ('kv_bias', {'sink_logit_init': -10.0}, False): the same graft with
    this variant's own step-0 options (checked against GraftOptions by the config)."""
    base, penalized = split_variant(name)
    graft, _, opts = base.partition("@")
    overrides: dict[str, float] = {}
    for item in opts.split(",") if opts else []:
        key, _, value = item.partition("=")
        try:
            overrides[key.strip()] = float(value)  # no '=': value is '' and fails here
        except ValueError:
            raise ValueError(f"variant '{name}': '{item}' is not key=number") from None
    return graft, overrides, penalized


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GraftOptions(_Strict):
    sink_logit_init: float = Field(-10.0, le=0)  # kv_bias: slot logit bias at step 0 (more negative: closer, slower)
    gate_bias_init: float = 0.0  # gated: gate sigmoid(b0) at step 0, o_proj × 1/sigmoid(b0) (0: bit-exact)
    clip_gamma: float = Field(-0.03, le=0)  # clipped_softmax: target γ
    clip_zeta: float = Field(1.0, ge=1)  # clipped_softmax: target ζ
    clip_ramp_steps: int = Field(20, ge=0)  # γ, ζ go linearly from (0, 1) (exactly softmax) to the targets


class PenaltyConfig(_Strict):
    """The residual-stream outlier penalty of the `<variant>+penalty` variants (issue 25: tells "the model
    can do without its outliers" from "they take longer to unlearn"). Total training loss =
    cross-entropy + weight × penalty; the logged train curve stays the cross-entropy alone.

    Hidden states: the outputs of the chosen decoder layers (0-based indices, as in optim.train_layers),
    i.e. the residual stream after each layer, h [B, T, D], read by forward hooks. These are Hugging
    Face's output_hidden_states[1..L] (the embedding output excluded), except that for the last layer it
    is the residual before the final norm (HF's hidden_states[L] is after it).
      kurtosis: per token, the plain (Pearson) kurtosis over the hidden dimension,
                E[(h − μ)^4] / σ^4 with μ, σ² the mean and (biased) variance over D; averaged over the
                B·T tokens and then over the layers. A Gaussian gives 3; a token with a massive
                activation in 2 of 576 dims gives ≈ 576/2 = 288. The mean over tokens weights one
                outlier token by 1/T (≈ 288/256 on a 256-token window).
      max:      per layer, max |h| / RMS(h), both over the whole [B, T, D] tensor; averaged over layers.
    Every variant logs the penalty of its training batches (`penalty` in log.json); only `+penalty`
    variants add it to the loss."""

    kind: Literal["kurtosis", "max"] = "kurtosis"
    weight: float = Field(0.1, gt=0)
    layers: Literal["all"] | tuple[int, ...] = "all"

    @field_validator("layers")
    @classmethod
    def _layers(cls, v):
        if v != "all" and (not v or len(set(v)) != len(v) or min(v) < 0):
            raise ValueError(f"must be 'all' or a non-empty list of distinct decoder layer indices >= 0, got {list(v)}")
        return v


class RetrofitData(_Strict):
    """Training windows come from the corpus's calibration text only; the held-out loss, the probes and
    the sweep's perplexity read the first `heldout_tokens` tokens of its evaluation text."""

    corpus: str = "wiki"
    heldout_tokens: int = Field(8192, ge=64)
    heldout_windows: int = Field(8, ge=1)


class RetrofitOptim(_Strict):
    steps: int = Field(100, ge=1)
    batch_size: int = Field(4, ge=1)
    context: int = Field(256, ge=8)  # training sequence length ([BOS] + context-1 tokens)
    lr: float = Field(2e-5, gt=0)  # pretrained weights
    graft_lr: float = Field(1e-2, gt=0)  # the graft's own parameters (they start far from where they are useful)
    graft_eps: float = Field(1e-8, gt=0)  # AdamW eps of the graft group: below the graft gradients' size, every
    # graft parameter moves at ~graft_lr per step however small its gradient (kv_bias at a very negative slot logit)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup: int = Field(5, ge=0)
    weight_decay: float = Field(0.0, ge=0)  # on pretrained matrices only
    grad_clip: float = Field(1.0, gt=0)
    train_layers: Literal["all"] | tuple[int, ...] = "all"  # decoder layers whose pretrained weights train
    train_embeddings: bool = False  # the (tied) embedding / lm_head
    eval_every: int = Field(10, ge=1)  # held-out loss (and at step 0 and the end)
    probe_every: int = Field(25, ge=1)  # outlier probes (and at step 0 and the end)
    ckpt_every: int = Field(5, ge=1)  # resumable checkpoint


class ProbeConfig(_Strict):
    windows: int = Field(4, ge=1)  # held-out windows (context tokens each) the census reads
    dims: tuple[int, ...] = (507, 247)  # residual dims whose first-token value is tracked per layer
    linear_inputs: bool = False  # also profile every linear's input (slower)


class RetrofitSweep(_Strict):
    enabled: bool = True
    recipes: tuple[str, ...] = ("fp", "w8a8-tensor-static", "w8a8-token", "w4a16-g64", "w4a8-token",
                                "w8a8-tensor-static-sq", "w8a8-tensor-static-rot")
    eval_seq_len: int = Field(256, ge=8)
    eval_windows: int = Field(8, ge=1)
    calib_samples: int = Field(16, ge=1)
    batch_size: int = Field(1, ge=1)

    @field_validator("recipes")
    @classmethod
    def _known(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for r in v:
            PRESETS.get(r)
        return v if "fp" in v else ("fp", *v)


class RetrofitConfig(RunNamed, _Strict):
    experiment: Literal["retrofit"]
    model: str = "default"  # a pretrained Llama: 'default', a folder or a hub id
    run_id: str | None = None
    output_dir: str = "results"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(None, ge=1)
    precision: Literal["float32", "bf16-autocast"] = "float32"
    variants: tuple[str, ...] = (CONTROL, "kv_bias", "ca_scale", "gated", "clipped_softmax", "softmax_plus_one")
    grafts: GraftOptions = GraftOptions()
    data: RetrofitData = RetrofitData()
    optim: RetrofitOptim = RetrofitOptim()
    probe: ProbeConfig = ProbeConfig()
    sweep: RetrofitSweep = RetrofitSweep()
    penalty: PenaltyConfig = PenaltyConfig()  # used by the `+penalty` variants (and logged for all)

    @field_validator("variants")
    @classmethod
    def _variants(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for x in v:
            base, overrides, _ = variant_spec(x)
            if base != CONTROL:
                GRAFTS.get(base)  # UnknownName is a ValueError: reported at this key
            elif overrides:
                raise ValueError(f"variant '{x}': the control has no graft options")
            unknown = sorted(set(overrides) - set(GraftOptions.model_fields))
            if unknown:
                raise ValueError(f"variant '{x}': unknown graft option {unknown[0]} (known: "
                                 f"{', '.join(GraftOptions.model_fields)})")
            try:
                GraftOptions(**overrides)
            except ValidationError as e:
                err = e.errors()[0]
                raise ValueError(f"variant '{x}': {err['loc'][0]} {err['msg']}") from None
        if not v or len(set(v)) != len(v):
            raise ValueError("must be a non-empty list of distinct variants")
        return v

    @model_validator(mode="after")
    def _fits(self) -> "RetrofitConfig":
        need = self.optim.context * max(self.data.heldout_windows, self.probe.windows)
        if need > self.data.heldout_tokens:
            raise ValueError(f"optim.context x max(data.heldout_windows, probe.windows) = {need} exceeds "
                             f"data.heldout_tokens ({self.data.heldout_tokens})")
        if self.sweep.enabled and self.sweep.eval_seq_len * self.sweep.eval_windows > self.data.heldout_tokens:
            raise ValueError("sweep.eval_seq_len x sweep.eval_windows exceeds data.heldout_tokens: the sweep must "
                             "score held-out text")
        return self

    def fingerprint(self) -> str:
        """As RunNamed's; a default `penalty` block is left out, so configs from before it keep their run
        directory, and a changed penalty gives a new one."""
        if self.penalty != PenaltyConfig():
            return super().fingerprint()
        d = self.model_dump(mode="json", exclude={"run_id", "output_dir", "threads", "variants", "sweep", "penalty"})
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:8]

    def run_dir(self, config_name: str = "retrofit") -> Path:
        return super().run_dir(config_name)

    def grafts_of(self, variant: str) -> GraftOptions:
        """`grafts`, with the variant's own overrides ('kv_bias@sink_logit_init=-10') applied."""
        return self.grafts.model_copy(update=variant_spec(variant)[1])


def parse_retrofit_config(data: dict[str, Any] | None) -> RetrofitConfig:
    return validate(RetrofitConfig, data)
