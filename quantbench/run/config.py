"""Typed, validated run config. Unknown keys, wrong types and impossible values are one-line errors."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer,
                      model_validator)

from ..core.errors import ConfigError
from ..core.registry import suggest
from ..mixed.options import base_problem
from ..quant.recipes import PRESETS, resolve_recipe
from ..quant.spec import Recipe


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # every number finite


class CorpusConfig(_Strict):
    """name: `wiki` | `news` (offline built-ins), `wikitext2` | `c4` (hub), `hf:<dataset>[:<config>]:<split>`, or a text file path."""

    name: str = "wiki"
    calib_samples: int = Field(8, ge=1)
    calib_seq_len: int = Field(256, ge=8)


class EvalConfig(_Strict):
    """Perplexity/fidelity protocol: windows of `seq_len` tokens every `stride` tokens."""

    seq_len: int = Field(512, ge=8)
    stride: int | None = Field(None, ge=1)  # None = seq_len (disjoint windows)
    max_windows: int = Field(8, ge=1)
    bos: bool = True  # prepend the BOS token to every window (and do not score it)
    batch_size: int = Field(4, ge=1)
    expected_fp_ppl: float | None = None  # sanity check: warn when FP ppl differs by > 10%
    word_ppl: bool = True  # also report word-level perplexity (exp(total NLL / words)), as lm-eval does
    probe_windows: int = Field(1, ge=0)  # windows used for per-layer error / attention drift (0: off)
    ci_block: int = Field(128, ge=8)  # scored tokens per bootstrap unit of the paired intervals
    # KV rows also scored with the cache filled this many tokens at a time (decode order; None: off)
    kv_decode_chunk: int | None = Field(None, ge=1)

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        """kv_decode_chunk off is left out, so configs written before it keep their fingerprint."""
        d = handler(self)
        if isinstance(d, dict) and d.get("kv_decode_chunk") is None:
            d.pop("kv_decode_chunk", None)
        return d

    @model_validator(mode="after")
    def _stride(self) -> "EvalConfig":
        if self.stride is not None and self.stride > self.seq_len:
            raise ValueError(f"stride ({self.stride}) must not exceed seq_len ({self.seq_len})")
        return self

    @property
    def effective_stride(self) -> int:
        return self.stride or self.seq_len


class CensusConfig(_Strict):
    """Outlier census settings; every threshold is written into census.json (see docs/census.md)."""

    enabled: bool = True
    samples: int = Field(4, ge=1)
    seq_len: int = Field(256, ge=8)
    abs_threshold: float = Field(100.0, gt=0)  # |x| floor for an activation outlier (Massive Activations)
    ratio_threshold: float = Field(1000.0, gt=1)  # |x| / layer median for an activation outlier
    top_k: int = Field(5, ge=1)
    weight_ratio: float = Field(4.0, gt=1)  # a W row/column stands out: its max|W|/mean|W| > this x the median one
    sink_threshold: float = Field(0.3, gt=0, le=1)  # attention mass (mean over queries) that makes a key a sink
    linear_inputs: bool = True  # also profile the inputs of every linear layer (q/k/v, o, up/gate, down)
    prequant_block: int = Field(32, ge=2)  # block size for the already-quantized-weights check
    prequant_max_levels: int = Field(16, ge=2)  # <= this many distinct values per block = on a low-bit grid
    max_records: int = Field(4096, ge=16)  # per layer, largest elements above abs_threshold kept for positions
    plots: bool = True  # write PNG plots next to census.json


class TasksConfig(_Strict):
    """Downstream accuracy through lm-eval. names: offline pack tasks (qb_*) or any lm-eval task
    name (needs the hub). limit: documents per task (a fixed, pre-shuffled sample); None = all."""

    names: tuple[str, ...] = ()
    limit: int | None = Field(100, ge=1)
    num_fewshot: int = Field(0, ge=0)
    batch_size: int = Field(16, ge=1)
    metric: Literal["acc", "acc_norm"] = "acc"  # what recommend/plots use
    include_path: str | None = None  # folder with your own lm-eval task YAMLs (offline)


class RecommendConfig(_Strict):
    """Tolerances for the recommendation printed at the end of a run (`quantbench recommend` too)."""

    max_ppl_increase_pct: float = Field(2.0, ge=0)
    min_task_retention_pct: float | None = Field(None, gt=0, le=100)


AUTO_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
_DEVICE = re.compile(r"cpu|mps|cuda(:\d+)?")  # one device accelerate can place weights on ('disk' is a map entry's)


class PlacementConfig(_Strict):
    """Where the weights live, through accelerate (docs/scale.md). device_map: 'auto' | 'balanced' |
    'balanced_low_0' | 'sequential' | one device ('cpu', 'cuda:0') | {module name: device}, where a device
    is 'cpu', 'disk', 'cuda[:N]' or a GPU index, '' places every module no other entry places, and no
    entry lies inside another; max_memory: {device: bytes or '20GiB'} for the automatic maps;
    offload_folder: where 'disk' entries are written (needed by them). None: the whole model on `device`.
    Placement does not change results, so it is not part of a run's fingerprint."""

    device_map: str | dict[str, str | int] | None = None
    max_memory: dict[str | int, str | int] | None = None
    offload_folder: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> "PlacementConfig":
        dm = self.device_map
        if self.max_memory is not None and dm not in AUTO_MAPS:
            raise ValueError("max_memory needs device_map 'auto', 'balanced', 'balanced_low_0' or 'sequential'")
        if isinstance(dm, str) and dm not in AUTO_MAPS and not _DEVICE.fullmatch(dm):
            raise ValueError(f"device_map: {dm!r} is neither {', '.join(AUTO_MAPS)} nor one device (cpu, cuda, cuda:N)")
        if isinstance(dm, dict):
            if not dm:
                raise ValueError("device_map: an empty mapping places nothing")
            for k, v in dm.items():
                if not (isinstance(v, int) and v >= 0) and not (isinstance(v, str) and (v == "disk" or _DEVICE.fullmatch(v))):
                    raise ValueError(f"device_map: {k!r}: unknown device {v!r} (cpu, disk, cuda, cuda:N or a GPU index)")
                outer = next((o for o in dm if o and k.startswith(o + ".")), None)
                if outer is not None:
                    raise ValueError(f"device_map: {k!r} lies inside {outer!r}, which is placed already: give each module "
                                     f"one entry (place the parts of {outer!r} one by one, or drop {k!r})")
            if "disk" in dm.values() and self.offload_folder is None:
                disk = next(k for k, v in dm.items() if v == "disk")
                raise ValueError(f"device_map: {disk!r} goes to disk, which needs offload_folder (where its weights are written)")
        for k in self.max_memory or {}:
            if not (isinstance(k, int) and k >= 0) and not (isinstance(k, str) and (k == "disk" or _DEVICE.fullmatch(k))):
                raise ValueError(f"max_memory: unknown device {k!r} (cpu, disk, cuda:N or a GPU index)")
        return self

    def load_kwargs(self) -> dict:
        """The from_pretrained arguments (empty when no device map is set)."""
        if self.device_map is None:
            return {}
        kw: dict = {"device_map": self.device_map}
        if self.max_memory is not None:
            kw["max_memory"] = dict(self.max_memory)
        if self.offload_folder is not None:
            kw["offload_folder"] = self.offload_folder
        return kw


class CalibrationConfig(_Strict):
    """How statistics that need activations are collected: `parallel` hooks every linear and runs the
    whole model per batch; `sequential` runs one decoder layer at a time on all calibration batches,
    holding only that layer's inputs (quant/sequential.py). On the FP model both give the same
    statistics, so the mode is not part of a run's fingerprint."""

    mode: Literal["parallel", "sequential"] = "parallel"


NOT_RESULTS = {"placement", "calibration"}  # settings that do not change a row (left out of the keys)


class ExecutorConfig(_Strict):
    """Where the recipe cells run (docs/ray.md). `serial`: this process, one after
    another. `ray`: one Ray task per (model, recipe) cell, with these resources per task; the driver
    writes every row through the same rows.jsonl. Results do not depend on it (not in the fingerprint)."""

    kind: Literal["serial", "ray"] = "serial"
    address: str | None = None  # ray: 'auto', 'host:6379' or 'ray://host:10001'; None = start a local Ray
    num_cpus: float = Field(1.0, gt=0)  # per cell (also the torch threads of a worker unless `threads` is set)
    num_gpus: float = Field(0.0, ge=0)  # per cell; fractions share a GPU
    max_retries: int = Field(2, ge=0)  # a cell whose worker died is rerun this often, then left missing
    local_cpus: int | None = Field(None, ge=1)  # a local Ray (address None): CPUs it may use (None: all)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, v: Any) -> Any:
        return {"kind": v} if isinstance(v, str) else v  # `executor: ray`

    @model_validator(mode="after")
    def _address_needs_ray(self) -> "ExecutorConfig":
        if self.kind == "serial" and self.address is not None:
            raise ValueError(f"a Ray address ({self.address!r}) is given but the executor is serial: add "
                             "--executor ray (kind: ray), or drop the address")
        return self


class MixedConfig(_Strict):
    """One census-guided mixed-precision recipe, searched after the uniform rows and evaluated like
    them (quantbench/mixed; docs/mixed-precision.md). Exactly one constraint: budget (bits/weight),
    budget_over_base (bits/weight added to the base recipe's measured size), max_ppl_increase (percent,
    estimated) or max_kept (linears moved off the base format: a count, or a share when below 1)."""

    name: str | None = None  # default: mixed-<base>-<constraint>
    base: str = "w4a16-g64"  # a recipe of this config or a preset
    budget: float | None = Field(None, gt=0, le=16)
    budget_over_base: float | None = Field(None, ge=0, le=12)
    max_ppl_increase: float | None = Field(None, gt=0)
    max_kept: float | None = Field(None, gt=0)
    samples: int = Field(4, ge=1)  # calibration sequences of the sensitivity pass (one backward each)
    validate_layers: int = Field(0, ge=0)  # linears whose single-layer KL is measured against the estimate
    fused: bool = True  # q/k/v and gate/up of a layer share one format (vLLM fuses them); false: free per linear
    refine: int = Field(0, ge=0, le=3)  # passes re-measuring the sensitivities around the chosen plan (weight-only)

    @model_validator(mode="after")
    def _one(self) -> "MixedConfig":
        set_ = [k for k in ("budget", "budget_over_base", "max_ppl_increase", "max_kept") if getattr(self, k) is not None]
        if len(set_) != 1:
            raise ValueError("give exactly one of budget, budget_over_base, max_ppl_increase, max_kept"
                             + (f" (got {', '.join(set_)})" if set_ else ""))
        return self

    def label(self) -> str:
        if self.name:
            return self.name
        c = (f"b{self.budget:g}" if self.budget is not None else f"b+{self.budget_over_base:g}"
             if self.budget_over_base is not None else f"p{self.max_ppl_increase:g}"
             if self.max_ppl_increase is not None else f"k{self.max_kept:g}")
        return f"mixed-{self.base}-{c}" + ("" if self.fused else "-unfused") + (f"-r{self.refine}" if self.refine else "")


class RunConfig(_Strict):
    run_id: str | None = None  # a plain name: the folder under output_dir

    @field_validator("run_id")
    @classmethod
    def _plain_name(cls, v: str | None) -> str | None:
        if v is not None and (v in (".", "..") or not re.fullmatch(r"[A-Za-z0-9._+=-]+", v)):
            raise ValueError(f"must be a plain folder name (letters, digits, . _ + = -), got {v!r}: "
                             "the run directory is <output_dir>/<run_id>")
        return v

    seed: int = 0
    model: str = "default"
    models: tuple[str, ...] = ()  # several checkpoints: one run directory each, cells = models x recipes
    executor: ExecutorConfig = ExecutorConfig()
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    threads: int | None = Field(None, ge=1)
    output_dir: str = "results"
    corpus: CorpusConfig = CorpusConfig()
    eval: EvalConfig = EvalConfig()
    census: CensusConfig = CensusConfig()
    tasks: TasksConfig = TasksConfig()
    recommend: RecommendConfig = RecommendConfig()
    recipes: tuple[Recipe, ...] = Field(default_factory=lambda: (resolve_recipe("fp"),))
    mixed: tuple[MixedConfig, ...] = ()  # census-guided mixed recipes, built and evaluated after `recipes`
    export: tuple[str, ...] = ()  # recipes to export after the sweep (quantbench/export): results/<run-id>/export/<name>/
    placement: PlacementConfig = PlacementConfig()
    calibration: CalibrationConfig = CalibrationConfig()

    @field_validator("recipes", mode="before")
    @classmethod
    def _resolve(cls, v: Any) -> Any:
        if not isinstance(v, (list, tuple)) or not v:
            raise ValueError("must be a non-empty list of recipes")
        return tuple(resolve_recipe(e) if isinstance(e, (str, dict)) else e for e in v)

    @model_validator(mode="after")
    def _unique(self) -> "RunConfig":
        names = [r.name for r in self.recipes]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"recipe names must be unique; repeated: {', '.join(sorted(dup))}")
        for i, m in enumerate(self.mixed):  # everything the search needs that no model decides: checked here
            where = f"mixed[{i}] ({m.label()})"
            if m.base not in names and m.base not in PRESETS.names():
                raise ValueError(f"{where}: base '{m.base}' is neither a recipe of this config nor a preset"
                                 f"{suggest(m.base, names + list(PRESETS.names()))}")
            if m.label() in names:
                raise ValueError(f"{where}: name '{m.label()}' repeats a recipe name")
            base = next((r for r in self.recipes if r.name == m.base), None) or PRESETS.get(m.base)
            why = base_problem(base, m.refine)
            if why is not None:
                raise ValueError(f"{where}: {why}")
            names = names + [m.label()]
        for name in self.export:
            if name not in names:
                raise ValueError(f"export: '{name}' is not one of the recipes{suggest(name, names)}")
        if self.models and "model" in self.model_fields_set:
            raise ValueError("set either `model` or `models`, not both")
        dup = {m for m in self.models if self.models.count(m) > 1}
        if dup:
            raise ValueError(f"models must be unique; repeated: {', '.join(sorted(dup))}")
        return self

    def per_model(self) -> list["RunConfig"]:
        """One config per checkpoint of `models` (or this one): each is an ordinary single-model run."""
        if not self.models:
            return [self]
        return [self.model_copy(update={"model": m, "models": ()}) for m in self.models]

    def fingerprint(self) -> str:
        """Short hash of everything that changes results (not run_id/output_dir)."""
        d = self.model_dump(mode="json", exclude={"run_id", "output_dir", "recommend", "export",
                                                  "models", "executor", *NOT_RESULTS})
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:8]


_NAMES_ITS_KEY = re.compile(r"^[a-z_]+(\[\d+\])?( \([^)]*\))?: ")  # 'export: ...', 'mixed[0] (name): ...'


def _format_error(err: ValidationError, prefix: str = "config: ") -> str:
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-after"))
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == "extra_forbidden":
        msg = "unknown key"
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    if not loc and _NAMES_ITS_KEY.match(msg):  # a whole-config check that names the key itself
        return f"{prefix}{msg}{more}"
    return f"{prefix}{loc or '<root>'}: {msg}{more}"


def validate(cls: type[BaseModel], data: dict[str, Any] | None):
    """cls.model_validate with a one-line ConfigError naming the first offending key."""
    try:
        return cls.model_validate(data or {})
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None


def validate_options(cls: type[BaseModel], options: dict[str, tuple[str, Any]]) -> None:
    """Command-line options checked by the config's own model: {field: (option name, value)}; a
    mistake is one ConfigError naming the option (the same bounds as in a config file)."""
    try:
        cls.model_validate({k: v for k, (_, v) in options.items() if v is not None})
    except ValidationError as err:
        e = err.errors()[0]
        field = str(e["loc"][0]) if e["loc"] else ""
        name = options.get(field, (field or "options", None))[0]
        raise ConfigError(f"{name}: {e['msg'].removeprefix('Value error, ')}") from None


def _yaml_error(p: Path, e: yaml.YAMLError) -> str:
    """'config F is not valid YAML (line L, column C): problem' -- the position of the mistake kept."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    return f"config {p} is not valid YAML{where}: {' '.join(str(problem).split())}"


class DuplicateKey(yaml.YAMLError):
    """A mapping key given twice (1-based line numbers of both)."""

    def __init__(self, key: Any, first: int, second: int):
        where = f"lines {first} and {second}" if first != second else f"both on line {first}"
        super().__init__(f"key {key!r} appears twice ({where})")


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (safe_load keeps the last silently).
    Keys brought in by a merge (`<<: *anchor`) may still be overridden: that is what merging is for."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise DuplicateKey(key, seen[key], line)
                seen[key] = line
            except TypeError:
                continue  # unhashable: SafeLoader says so itself
        return super().construct_mapping(node, deep=deep)


def read_yaml_mapping(path: str | Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """A YAML file's top-level mapping plus the non-None overrides; one-line errors (a key given twice
    in one mapping, at any depth, is one: YAML's last-wins would drop the first silently)."""
    p = Path(path)
    try:
        data = yaml.load(p.read_text(encoding="utf-8"), Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except DuplicateKey as e:
        raise ConfigError(f"config {p}: {e}") from None
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {p}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"cannot read config {p}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    except OSError as e:
        raise ConfigError(f"cannot read config {p}: [Errno {e.errno}] {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(_yaml_error(p, e)) from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"config {p} must be a mapping at the top level")
    return {**(data or {}), **{k: v for k, v in (overrides or {}).items() if v is not None}}


def _recipe_label(i: int, entry: Any) -> str:
    name = entry if isinstance(entry, str) else (entry.get("name") or entry.get("preset")) if isinstance(entry, dict) else None
    return f"recipes[{i}]" + (f" ({name})" if isinstance(name, str) and name else "")


def resolve_recipes(entries: Any) -> Any:
    """Resolve each recipe entry; an error names the entry: `config: recipes[2] (my-w8a8): weights.bits: ...`."""
    if not isinstance(entries, (list, tuple)):
        return entries  # the field validator says what is wrong
    out = []
    for i, entry in enumerate(entries):
        if isinstance(entry, Recipe):
            out.append(entry)
            continue
        try:
            out.append(resolve_recipe(entry))
        except ValidationError as err:
            raise ConfigError(_format_error(err, f"config: {_recipe_label(i, entry)}: ")) from None
        except (ConfigError, ValueError, TypeError) as err:
            msg = str(err).removeprefix("config: ").removeprefix("recipes: ")
            raise ConfigError(f"config: {_recipe_label(i, entry)}: {' '.join(msg.split())}") from None
    return out


def parse_config(data: dict[str, Any]) -> RunConfig:
    if isinstance(data, dict) and "recipes" in data:
        data = {**data, "recipes": resolve_recipes(data["recipes"])}
    return validate(RunConfig, data)


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    return parse_config(read_yaml_mapping(path, overrides))


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
