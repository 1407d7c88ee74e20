"""Keep the systematic outlier tokens in high precision (PrefixQuant / "Systematic Outliers" style).

A few tokens (the first token, strong delimiters, some weak-semantic words) carry residual-stream
values 10^3x the median; they dominate per-tensor activation ranges. This mitigation finds them
on calibration data with the census criterion of PrefixQuant: a token is an outlier in a layer when
its max |h| over channels exceeds `ratio` (64) times the median over the sequence's tokens of that
token-wise max, at the output of any decoder layer. Token ids that are outliers in at least
`min_freq` of their occurrences (and occur at least twice) become the kept set.

At run time a forward pre-hook on the model reads input_ids and sets `token_keep` [B, T] on every
QuantLinear: kept tokens' activations are not quantized and are left out of static (calibrated)
and dynamic ranges alike.

Options:
  first_token: keep position 0 (default true).
  ids: explicit token ids to keep, or "calibrate" (default) to find them as above.
  ratio (64), min_freq (0.5), calib_samples (default 8).
  dynamic: also keep, per decoder layer, any token whose layer input max|h| / median exceeds
           `ratio` (decided online from hidden states; default false).
"""
from __future__ import annotations

import sys
from collections import Counter
from typing import Any

import torch
import torch.nn as nn

from ...arch import get_module
from ..qlinear import QuantLinear
from . import register
from ._util import calib_subset, require, require_arch, run_model


def token_ratio(h: torch.Tensor) -> torch.Tensor:
    """[B, T, D] hidden states -> [B, T] token max |h| / median over the sequence of token maxima."""
    m = h.detach().abs().amax(-1).float()  # [B, T]
    return m / m.median(dim=1, keepdim=True).values.clamp_min(1e-12)


@torch.no_grad()
def find_outlier_ids(model: nn.Module, batches: torch.Tensor, arch, ratio: float, min_freq: float, ctx) -> list[int]:
    layers = get_module(model, arch.layers)
    flag = {"m": None}

    def hook(_m, _inp, out):
        h = out[0] if isinstance(out, (tuple, list)) else out
        r = token_ratio(h) > ratio
        flag["m"] = r if flag["m"] is None else flag["m"] | r

    seen, hits = Counter(), Counter()
    handles = [layer.register_forward_hook(hook) for layer in layers]
    try:
        for i in range(0, len(batches), ctx.batch_size):
            ids = batches[i: i + ctx.batch_size]
            flag["m"] = None
            run_model(model, ids, ctx.batch_size, ctx.device)
            body, m = ids[:, 1:].reshape(-1).tolist(), flag["m"][:, 1:].reshape(-1).cpu().tolist()  # position 0 apart
            seen.update(body)
            hits.update(t for t, f in zip(body, m) if f)
    finally:
        for h in handles:
            h.remove()
    return sorted(t for t, n in hits.items() if seen[t] >= 2 and n / seen[t] >= min_freq)


def check(model: nn.Module, recipe) -> None:
    require(recipe, "activations", "outlier_tokens")
    require_arch(model, "outlier_tokens")


def calibrate(model: nn.Module, batches: torch.Tensor, opts: dict[str, Any], ctx) -> dict:
    ids = opts.get("ids", "calibrate")
    ratio, min_freq = float(opts.get("ratio", 64.0)), float(opts.get("min_freq", 0.5))
    if ids == "calibrate":
        ids = find_outlier_ids(model, calib_subset(batches, opts, 8), ctx.arch, ratio, min_freq, ctx)
    return {"ids": torch.tensor([int(t) for t in ids], dtype=torch.long), "ratio": ratio}


def _set_keep(root: nn.Module, mask: torch.Tensor | None) -> None:
    for m in root.modules():
        if isinstance(m, QuantLinear):
            m.token_keep = mask


def install(model: nn.Module, ids: torch.Tensor, first_token: bool, dynamic_ratio: float | None, arch) -> list:
    """Register the hooks that compute token_keep per forward; returns their handles."""
    state: dict[str, torch.Tensor] = {}

    def model_hook(_m, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            _set_keep(model, None)
            return
        mask = torch.isin(input_ids, ids.to(input_ids.device))  # [B, T]
        if first_token:
            mask[:, 0] = True
        state["mask"] = mask
        _set_keep(model, mask)

    handles = [model.register_forward_pre_hook(model_hook, with_kwargs=True)]
    if dynamic_ratio is not None:
        def layer_hook(layer, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            if "mask" in state:
                _set_keep(layer, state["mask"] | (token_ratio(h) > dynamic_ratio))
        handles += [lay.register_forward_pre_hook(layer_hook, with_kwargs=True)
                    for lay in get_module(model, arch.layers)]
    return handles


def apply(model: nn.Module, stats: dict, opts: dict[str, Any], ctx) -> nn.Module:
    dyn = stats["ratio"] if opts.get("dynamic", False) else None
    install(model, stats["ids"], bool(opts.get("first_token", True)), dyn, ctx.arch)
    ctx.notes["outlier_token_ids"] = stats["ids"].tolist()[:32]
    return model


register("outlier_tokens", sys.modules[__name__])
