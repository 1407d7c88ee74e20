"""Check the sensitivity estimate against measurement: quantize ONE linear alone (to its base option),
measure the end-to-end KL(P_fp || P_q) on probe windows against cached FP logits, and report the
Spearman rank correlation between the estimates and the measurements over a sample of linears."""
from __future__ import annotations

import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..quant.backends._common import reattach_online
from ..quant.calibration import Calibration
from ..quant.spec import Recipe
from .options import options_for
from .sensitivity import Sensitivity, _qlinear, mitigated, static_absmax


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rho (scipy.stats.spearmanr: Pearson correlation of average ranks)."""
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def sample_linears(s: Sensitivity, n: int, option: int = 0) -> list[str]:
    """n linears evenly spaced over the ranking of their estimate (the extremes included)."""
    ranked = sorted(s.linears, key=lambda l: s.score[l][option], reverse=True)
    if n >= len(ranked):
        return ranked
    idx = sorted({round(j * (len(ranked) - 1) / max(n - 1, 1)) for j in range(n)})
    return [ranked[j] for j in idx]


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` at `name` for one measurement. Not surgery.replace_module: during a run its callback
    (quantbench/modeling/pristine.py) frees the weights of the module taken out, and the FP linear comes back here."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


@torch.no_grad()
def _logp(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(model(input_ids=ids).logits[:, 1:-1].float(), -1)  # [W, T-2, V]: BOS excluded


@torch.no_grad()
def single_layer_kl(model: nn.Module, base: Recipe, names: list[str], ids: torch.Tensor, calib: Calibration,
                    option: int = 0) -> dict[str, float]:
    """name -> mean KL(P_fp || P_q) (nats per token) with only that linear quantized to `option`."""
    opt = options_for(base)[option]
    model, upstream = mitigated(model, base, calib)
    mods = {n: model.get_submodule(n) for n in names}
    absmax = static_absmax(model, mods, calib, upstream, [opt])
    ref = _logp(model, ids)
    out = {}
    for n in names:
        q = _qlinear(n, mods[n], opt, absmax.get(n))
        reattach_online(mods[n], q)
        _swap(model, n, q)
        try:
            lq = _logp(model, ids)
        finally:
            _swap(model, n, mods[n])
        out[n] = float((ref.exp() * (ref - lq)).sum(-1).mean())
    return out


def validate(model: nn.Module, base: Recipe, s: Sensitivity, ids: torch.Tensor, calib: Calibration,
             n: int = 16) -> dict:
    """The estimate vs the measured single-linear KL on n sampled linears; stored in s.validation."""
    t0 = time.perf_counter()
    names = sample_linears(s, n)
    kl = single_layer_kl(model, base, names, ids, calib)
    est = [s.score[l][0] for l in names]
    s.validation = {"option": s.options[0], "linears": names, "estimate": est, "measured_kl": [kl[l] for l in names],
                    "spearman": spearman(est, [kl[l] for l in names]), "windows": int(ids.shape[0]),
                    "tokens_per_window": int(ids.shape[1]), "seconds": round(time.perf_counter() - t0, 2)}
    return s.validation
