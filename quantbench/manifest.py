"""Run manifest: everything needed to know what produced a result."""
from __future__ import annotations

import importlib.metadata as md
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

PACKAGES = ("quantbench", "torch", "transformers", "accelerate", "bitsandbytes", "optimum-quanto",
            "lm-eval", "pandas", "gguf", "safetensors")


def package_versions() -> dict[str, str | None]:
    out = {}
    for p in PACKAGES:
        try:
            out[p] = md.version(p)
        except md.PackageNotFoundError:
            out[p] = None
    return out


def git_revision() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
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
    }
