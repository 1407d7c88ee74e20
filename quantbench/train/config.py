"""Typed, validated config of the structural-outlier training experiment (`quantbench train`).

Same style as quantbench.run.config: unknown keys, wrong types and impossible values are one-line
ConfigErrors naming the key.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..quant.recipes import PRESETS
from ..run.config import read_yaml_mapping, validate
from .attention import VARIANTS


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RunNamed:
    """A training config's run directory: `<output_dir>/<run_id>`, or `<config name>-<fingerprint>`
    where the fingerprint covers what decides the trained models (not where they go, the threads, the
    variant list or the sweep)."""

    def fingerprint(self) -> str:
        d = self.model_dump(mode="json", exclude={"run_id", "output_dir", "threads", "variants", "sweep"})
        data = getattr(self, "data", None)
        if isinstance(data, DataConfig):  # only the keys of the data source in use (older fingerprints unchanged)
            d["data"] = data.model_dump(mode="json", include=set(data.used_keys()))
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:8]

    def run_dir(self, config_name: str) -> Path:
        return Path(self.output_dir) / (self.run_id or f"{config_name}-{self.fingerprint()}")


class ModelShape(_Strict):
    """Decoder shape shared by every variant (the vocabulary is the tokenizer's)."""

    layers: int = Field(4, ge=1)
    hidden: int = Field(128, ge=8)
    heads: int = Field(4, ge=1)
    intermediate: int = Field(512, ge=8)
    context: int = Field(128, ge=8)  # training sequence length = max positions
    tie_embeddings: bool = True  # 49152 x hidden embedding shared with lm_head keeps small models small
    clip_gamma: float = Field(-0.03, le=0)  # clipped_softmax: γ
    clip_zeta: float = Field(1.0, ge=1)  # clipped_softmax: ζ
    init_std: float = Field(0.02, gt=0)

    @model_validator(mode="after")
    def _heads(self) -> "ModelShape":
        if self.hidden % self.heads or (self.hidden // self.heads) % 2:
            raise ValueError(f"hidden ({self.hidden}) must be heads ({self.heads}) x an even head size")
        return self


_CORPUS_KEYS = ("corpus", "heldout_tokens", "tokenizer")  # data keys of source `corpus` only
_BB_KEYS = ("vocab", "triggers", "successors", "heldout_sequences", "task_seed")  # of source `bigram_backcopy` only


class DataConfig(_Strict):
    """source `corpus` (default): text. corpus: `wiki` | `news` (offline), `wikitext2` | `c4` |
    `hf:<ds>[:<cfg>]:<split>` (hub), or a text file. The first `heldout_tokens` tokens of the corpus's
    evaluation text are held out (the sweep's perplexity windows come from there too); training windows are
    drawn from the rest.

    source `bigram_backcopy`: the synthetic Bigram-Backcopy task (Guo et al. 2024; quantbench/train/data.py):
    `vocab` tokens + BOS, a sparse random bigram chain (`successors` next tokens per row, seeded by
    `task_seed`) and `triggers` trigger tokens after which the next token copies the one before the trigger.
    Training draws fresh sequences every step; `heldout_sequences` sequences of another seed are held out."""

    source: Literal["corpus", "bigram_backcopy"] = "corpus"
    corpus: str = "wiki"
    heldout_tokens: int = Field(16384, ge=64)
    heldout_windows: int = Field(8, ge=1)  # held-out loss = mean over this many context-length windows
    tokenizer: str = "default"  # a folder with tokenizer files, or "default" (SmolLM2's, 49152 tokens)
    vocab: int = Field(64, ge=2)  # bigram_backcopy: task tokens (the model's vocabulary is vocab + 1: BOS)
    triggers: int = Field(3, ge=0)  # bigram_backcopy: trigger tokens (the chain's most frequent ones)
    successors: int = Field(8, ge=1)  # bigram_backcopy: non-zero entries per bigram row
    heldout_sequences: int = Field(64, ge=8)  # bigram_backcopy: held-out sequences (loss, sweep, census)
    task_seed: int = 0  # bigram_backcopy: seeds the chain, the triggers and the held-out sequences

    def used_keys(self) -> tuple[str, ...]:
        if self.source == "corpus":
            return (*_CORPUS_KEYS, "heldout_windows")
        return ("source", *_BB_KEYS, "heldout_windows")

    @property
    def synthetic(self) -> bool:
        return self.source == "bigram_backcopy"

    @model_validator(mode="after")
    def _source_keys(self) -> "DataConfig":
        unused = _CORPUS_KEYS if self.synthetic else _BB_KEYS
        for k in unused:
            if k in self.model_fields_set:
                raise ValueError(f"{k} is not used with source: {self.source} (it takes "
                                 f"{', '.join(k2 for k2 in self.used_keys() if k2 != 'source')})")
        if self.synthetic:
            if self.successors > self.vocab:
                raise ValueError(f"successors ({self.successors}) must not exceed vocab ({self.vocab})")
            if self.triggers >= self.vocab:
                raise ValueError(f"triggers ({self.triggers}) must be fewer than vocab ({self.vocab})")
            if self.heldout_windows > self.heldout_sequences:
                raise ValueError(f"heldout_windows ({self.heldout_windows}) exceeds heldout_sequences "
                                 f"({self.heldout_sequences})")
        return self


class OptimConfig(_Strict):
    steps: int = Field(200, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(3e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup: int = Field(20, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    eval_every: int = Field(20, ge=1)  # held-out loss every this many steps (and at the end)
    ckpt_every: int = Field(50, ge=1)  # resumable checkpoint every this many steps


class SweepConfig(_Strict):
    """Census + quantization sweep on every final checkpoint (quantbench.run.pipeline.run)."""

    enabled: bool = True
    recipes: tuple[str, ...] = ("fp", "w8a8-tensor-static", "w8a8-token", "w4a16-g64")
    eval_seq_len: int = Field(128, ge=8)
    eval_windows: int = Field(8, ge=1)
    calib_samples: int = Field(8, ge=1)
    census_samples: int = Field(4, ge=1)
    batch_size: int = Field(4, ge=1)

    @field_validator("recipes")
    @classmethod
    def _known(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for r in v:
            PRESETS.get(r)  # UnknownName is a ValueError: reported at this key, with "did you mean"
        return v if "fp" in v else ("fp", *v)


class TrainConfig(RunNamed, _Strict):
    run_id: str | None = None
    output_dir: str = "results"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(None, ge=1)
    precision: Literal["float32", "bf16-autocast"] = "float32"
    compile: bool = False  # torch.compile the training step's model (skipped where unavailable)
    variants: tuple[str, ...] = ("softmax", "ca_scale", "kv_bias", "gated", "clipped_softmax", "sigmoid")
    model: ModelShape = ModelShape()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    sweep: SweepConfig = SweepConfig()
    target_losses: tuple[float, ...] | None = None  # held-out losses for steps-to-reach (None: from the baseline)

    @field_validator("variants")
    @classmethod
    def _variants(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for x in v:
            VARIANTS.get(x)  # UnknownName is a ValueError: reported at this key, with "did you mean"
        if not v or len(set(v)) != len(v):
            raise ValueError("must be a non-empty list of distinct variants")
        return v

    @model_validator(mode="after")
    def _fits(self) -> "TrainConfig":
        if self.data.synthetic:
            return self._fits_synthetic()
        need = self.sweep.eval_seq_len * self.sweep.eval_windows
        if self.sweep.enabled and need > self.data.heldout_tokens:
            raise ValueError(f"sweep needs {need} evaluation tokens (eval_seq_len x eval_windows) but "
                             f"data.heldout_tokens is {self.data.heldout_tokens}; the sweep must score held-out text")
        if self.sweep.eval_seq_len > self.model.context:
            raise ValueError(f"sweep.eval_seq_len ({self.sweep.eval_seq_len}) must not exceed model.context "
                             f"({self.model.context}): the models never saw longer sequences")
        if self.model.context * self.data.heldout_windows > self.data.heldout_tokens:
            raise ValueError("data.heldout_windows x model.context exceeds data.heldout_tokens")
        return self

    def _fits_synthetic(self) -> "TrainConfig":
        if self.sweep.eval_seq_len > self.model.context:
            raise ValueError(f"sweep.eval_seq_len ({self.sweep.eval_seq_len}) must not exceed model.context "
                             f"({self.model.context}): the models never saw longer sequences")
        if self.sweep.enabled and self.sweep.eval_windows > self.data.heldout_sequences:
            raise ValueError(f"sweep.eval_windows ({self.sweep.eval_windows}) exceeds data.heldout_sequences "
                             f"({self.data.heldout_sequences}); the sweep must score held-out sequences")
        if self.sweep.enabled and self.sweep.census_samples > self.data.heldout_sequences:
            raise ValueError(f"sweep.census_samples ({self.sweep.census_samples}) exceeds data.heldout_sequences "
                             f"({self.data.heldout_sequences})")
        return self

    def run_dir(self, config_name: str = "train") -> Path:
        return super().run_dir(config_name)


def parse_train_config(data: dict[str, Any] | None) -> TrainConfig:
    return validate(TrainConfig, data)


def load_train_config(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    return parse_train_config(read_yaml_mapping(path, overrides))
