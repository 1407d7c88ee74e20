"""Run manifest: everything needed to know what produced a result."""
from __future__ import annotations

import fnmatch
import functools
import hashlib
import importlib.metadata as md
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

PACKAGES = ("quantbench", "torch", "transformers", "accelerate", "bitsandbytes", "optimum-quanto",
            "lm-eval", "pandas", "gguf", "safetensors")


# Packages whose version can change a row's numbers (kernels, tokenization, task scoring, loading).
NUMERIC_PACKAGES = ("quantbench", "torch", "transformers", "tokenizers", "accelerate", "bitsandbytes",
                    "optimum-quanto", "lm-eval", "compressed-tensors", "torchao", "gguf", "safetensors")


# Code that never computes a row's numbers: the report layer (tables, plots, recommendations, all
# rebuilt from rows by `quantbench tables`), the test helpers, and the training experiment's procedure
# (its loops, configs, probes and reports; its model definitions, which the loader uses, stay keyed).
NOT_ROW_CODE = ("report/*", "testing/*", "train/bb_probe.py", "train/compare.py", "train/config.py", "train/data.py",
                "train/loop.py",
                "train/plots.py", "train/report.py", "train/run.py", "train/retrofit/config.py",
                "train/retrofit/loop.py", "train/retrofit/plots.py", "train/retrofit/probes.py",
                "train/retrofit/report.py", "train/retrofit/run.py")


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """sha256 of the quantbench code that computes rows: every .py file of the imported package
    except NOT_ROW_CODE. Part of every row's inputs key, so rows computed by other code are set aside
    and recomputed, while a change to a table or a training loop leaves the committed rows valid."""
    return tree_fingerprint(Path(__file__).resolve().parents[1], exclude=NOT_ROW_CODE)  # the package


def tree_fingerprint(root: Path, exclude: tuple[str, ...] = ()) -> str:
    """Short sha256 over the relative paths and bytes of every .py file below `root`, except those
    whose relative path matches a glob of `exclude`."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).as_posix()
        if any(fnmatch.fnmatch(rel, g) for g in exclude):
            continue
        h.update(rel.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def package_versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    out = {}
    for p in packages:
        try:
            out[p] = md.version(p)
        except md.PackageNotFoundError:
            out[p] = None
    return out


def git_revision(here: Path | None = None) -> str | None:
    """HEAD of the checkout quantbench runs from, with "-dirty" when a tracked file outside
    results/ differs from it: a run's own outputs (results/reference/...) are not the code that
    computed them, so writing one reference run does not mark the next one dirty."""
    here = here or Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                ":(top,exclude)results"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return rev.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def build_manifest(cfg, model_info: dict, corpus_info: dict, protocol: dict) -> dict:
    return {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "quantbench_git": git_revision(),
        "packages": package_versions(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "seed": cfg.seed,
        "device": model_info.get("device"),
        "dtype": model_info.get("dtype"),
        "threads": torch.get_num_threads(),
        "model": model_info,
        "corpus": corpus_info,
        "eval_protocol": protocol,
        "config_fingerprint": cfg.fingerprint(),
        "quantbench_code": code_fingerprint(),
    }


# ---------------------------------------------------------------- what the rows depend on
def run_inputs(cfg, model_info: dict, corpus_fingerprint: dict) -> dict:
    """Everything besides the recipe that changes a row: model content, corpus content, the
    settings of evaluation/calibration/tasks, the device and dtype, package versions, and
    quantbench's own code (code_fingerprint)."""
    settings = cfg.model_dump(mode="json", exclude={"run_id", "output_dir", "recommend", "recipes", "model",
                                                    "threads", "device", "census", "export",
                                                    "models", "executor",  # executor: same rows anywhere
                                                    "placement", "calibration",  # placement: same rows too
                                                    "mixed"})  # a mixed row is keyed by its searched recipe
    settings["corpus"].pop("name", None)  # the content is keyed, not the name
    return {"model": {"content": model_info.get("content_fingerprint"), "tensors": model_info.get("fingerprint"),
                      "dtype": model_info.get("dtype")},
            "corpus": dict(corpus_fingerprint),
            "settings": settings,
            "device": str(model_info.get("device", "")).split(":")[0],
            "packages": package_versions(NUMERIC_PACKAGES),
            "code": code_fingerprint()}


def inputs_key(inputs: dict, census: dict | None = None) -> str:
    """Short hash of `inputs` (plus the census settings for the census's own key)."""
    blob = json.dumps({"inputs": inputs, "census": census}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _flat(d, prefix: str = "") -> dict[str, object]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, object] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def changed_inputs(old: dict, new: dict) -> list[str]:
    """Dotted names of what differs, e.g. ['corpus.eval', 'settings.eval.seq_len', 'packages.torch']."""
    a, b = _flat(old), _flat(new)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
