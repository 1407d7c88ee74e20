"""Calibration as a stage: input statistics of linear layers, computed once per (model state,
calibration set, request) and reused by every recipe and mitigation that asks for the same thing.

The model state is named by `upstream`: the FP model's fingerprint plus the chain of mitigations
applied before the request (so SmoothQuant's statistics on the FP model serve every SmoothQuant
recipe, GPTQ's Hessians every GPTQ recipe with the same upstream). Each entry records the seconds
it took; `Calibration.ledger` lists (request, seconds, reused) so a row can show its share.

Statistics per linear input (streamed by hooks, never whole activations):
  absmax [D], absmean [D], n; optionally the Gram matrix XᵀX [D, D] (float64 accumulation,
  float64) with each token row scaled to unit RMS first (token_norm), and an evenly
  spaced sample of at most `sample_tokens` input rows.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

from ..core.hooks import input_hooks
from ..modeling.surgery import run_batches


@dataclass
class InputStats:
    absmax: torch.Tensor  # [D]
    absmean: torch.Tensor  # [D]
    n: int
    gram: torch.Tensor | None = None  # [D, D]
    sample: torch.Tensor | None = None  # [<= sample_tokens, D]


@dataclass(frozen=True)
class StatsRequest:
    samples: int = 8  # calibration sequences used (the first `samples`)
    gram: bool = False
    token_norm: bool = False
    sample_tokens: int = 0
    skip_first: int = 0


def tensor_key(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


@dataclass
class Calibration:
    """The calibration batches [N, T] and the statistics computed on them so far."""

    batches: torch.Tensor
    batch_size: int = 4
    device: torch.device = torch.device("cpu")
    base_key: str = ""  # e.g. the FP model's fingerprint; prefixed to every upstream key
    cache: dict[Any, Any] = field(default_factory=dict)
    ledger: list[tuple[str, float, bool]] = field(default_factory=list)
    # how input statistics are collected: collect_input_stats (every linear hooked, the whole model per
    # batch) or quant.sequential.sequential_input_stats (one decoder layer at a time; config calibration.mode)
    collect: Callable[..., dict[str, "InputStats"]] | None = None

    def __post_init__(self) -> None:
        self.data_key = tensor_key(self.batches)

    def subset(self, n: int) -> torch.Tensor:
        return self.batches[: max(1, n)]

    def memo(self, key: tuple, fn: Callable[[], Any], what: str) -> Any:
        """fn() once per key (key must include the upstream state); later calls reuse it."""
        full = (self.base_key, self.data_key, *key)
        if full in self.cache:
            self.ledger.append((what, 0.0, True))
            return self.cache[full]
        t0 = time.perf_counter()
        out = fn()
        self.cache[full] = out
        self.ledger.append((what, time.perf_counter() - t0, False))
        return out

    def input_stats(self, model: nn.Module, mods: dict[str, nn.Module], upstream: str,
                    req: StatsRequest = StatsRequest()) -> dict[str, InputStats]:
        key = ("inputs", upstream, tuple(sorted(mods)), req)
        collect = self.collect or collect_input_stats
        return self.memo(key, lambda: collect(model, mods, self.subset(req.samples), self.batch_size, self.device, req),
                         f"input stats ({len(mods)} linears{', Hessians' if req.gram else ''})")

    def seconds(self, since: int = 0) -> tuple[float, float]:
        """(seconds spent computing, seconds saved by reuse is unknown -> count of reuses) since ledger index."""
        spent = sum(s for _, s, reused in self.ledger[since:] if not reused)
        reused = sum(1 for _, _, r in self.ledger[since:] if r)
        return spent, reused


@torch.no_grad()
def collect_input_stats(model: nn.Module, mods: dict[str, nn.Module], batches: torch.Tensor, batch_size: int,
                        device: torch.device, req: StatsRequest,
                        forward: Callable[[], None] | None = None) -> dict[str, InputStats]:
    """One pass over `batches` with input hooks on `mods` (inputs shared by several modules, e.g.
    q/k/v, are accumulated once and reported under each name). forward: runs the pass instead of
    the model over `batches` (e.g. one decoder layer on its captured inputs, quant/sequential.py)."""
    acc: dict[str, dict] = {}
    step = max(1, -(-batches.numel() // req.sample_tokens)) if req.sample_tokens else 0

    def add(name: str, x: torch.Tensor) -> None:  # x [N, D]
        d = x.shape[1]
        s = acc.setdefault(name, {"absmax": torch.zeros(d), "abssum": torch.zeros(d, dtype=torch.float64),
                                  "n": 0, "rows": [], "gram": None})
        xc = x.cpu()
        s["absmax"] = torch.maximum(s["absmax"], xc.abs().amax(0))
        s["abssum"] += xc.abs().sum(0, dtype=torch.float64)
        s["n"] += xc.shape[0]
        if req.gram:
            xg = xc / xc.pow(2).mean(1, keepdim=True).sqrt().clamp_min(1e-12) if req.token_norm else xc  # [N, D]
            g = (xg.T @ xg).double()  # [D, D]: fp32 matmul per batch, fp64 accumulation
            s["gram"] = g if s["gram"] is None else s["gram"] + g
        if step:
            s["rows"].append(xc[::step].clone())  # [N / step, D]

    with input_hooks(mods, add, req.skip_first) as aliases:
        forward() if forward is not None else run_batches(model, batches, batch_size, device)
    out = {}
    for name, s in acc.items():
        rows = s["rows"]
        out[name] = InputStats(absmax=s["absmax"], absmean=(s["abssum"] / max(s["n"], 1)).float(), n=s["n"],
                               gram=s["gram"],
                               sample=torch.cat(rows)[: req.sample_tokens] if rows else None)
    for name, first in aliases.items():
        out[name] = out[first]
    return out
