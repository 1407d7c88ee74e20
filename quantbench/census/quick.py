"""A small census for result rows: how a recipe's mitigations moved the outliers.

census_max_abs / census_max_ratio: the census' largest residual |x| and its ratio to the layer
median; max_input_ratio: the largest max|x| / median|x| over the inputs the quantizers will see
(the planned linears, after any online transform). Run on the FP model before and after the
mitigations, on 2 x 128 calibration tokens.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..core.hooks import input_hooks
from ..modeling.surgery import run_batches
from ..run.config import CensusConfig
from .core import run_census


@torch.no_grad()
def max_input_ratio(model: nn.Module, ids: torch.Tensor, mods: dict[str, nn.Module], batch_size: int) -> float:
    best = [0.0]

    def fn(_name: str, x: torch.Tensor) -> None:  # x [N, D]
        a = x.abs()
        best[0] = max(best[0], float(a.max() / a.median().clamp_min(1e-12)))

    with input_hooks(mods, fn):
        run_batches(model, ids, batch_size)
    return best[0]


def outlier_note(model: nn.Module, ids: torch.Tensor, mods: dict[str, nn.Module], batch_size: int = 4) -> dict:
    """{'census_max_abs', 'census_max_ratio', 'max_input_ratio'} of the model on ids [N, T]."""
    cfg = CensusConfig(top_k=1, plots=False, linear_inputs=False)
    s = run_census(model, ids, None, cfg, batch_size=batch_size)["summary"]
    return {"census_max_abs": round(s["max_abs"], 2), "census_max_ratio": round(s["max_ratio"], 1),
            "max_input_ratio": round(max_input_ratio(model, ids, mods, batch_size), 1)}
