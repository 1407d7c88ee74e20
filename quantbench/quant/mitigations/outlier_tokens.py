"""Keep the systematic outlier tokens in high precision (PrefixQuant / "Systematic Outliers" style).

A few tokens (the first token, strong delimiters, some weak-semantic words) carry residual-stream
values 10^3x the median; they dominate per-tensor activation ranges. This mitigation finds them
on calibration data with the census criterion of PrefixQuant: a token is an outlier in a layer when
its max |h| over channels exceeds `ratio` (64) times the median over the sequence's tokens of that
token-wise max, at the output of any decoder layer. Token ids that are outliers in at least
`min_freq` of their occurrences (and occur at least twice) become the kept set.

At run time a forward pre-hook on the model reads input_ids and marks the kept positions [B, T];
every linear with quantized activations gets a KeepTokens policy: kept tokens' activations are not
quantized and are left out of static (calibrated) and dynamic ranges alike. The token-id table is
counted in the size (32 bits per id).

Options:
  first_token: keep position 0 (default true).
  ids: explicit token ids to keep, or "calibrate" (default) to find them as above.
  ratio (64), min_freq (0.5), calib_samples (default 8).
  dynamic: also keep, per decoder layer, any token whose layer input max|h| / median exceeds
           `ratio` (decided online from hidden states; default false).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn as nn
from pydantic import Field

from ...modeling.arch import get_module
from ...modeling.surgery import run_batches
from ..effects import Effects
from ..plugin import Mitigation, Options, QuantContext
from ..spec import MITIGATIONS


def token_ratio(h: torch.Tensor) -> torch.Tensor:
    """[B, T, D] hidden states -> [B, T] token max |h| / median over the sequence of token maxima."""
    m = h.detach().abs().amax(-1).float()  # [B, T]
    return m / m.median(dim=1, keepdim=True).values.clamp_min(1e-12)


@torch.no_grad()
def find_outlier_ids(model: nn.Module, batches: torch.Tensor, arch, ratio: float, min_freq: float,
                     batch_size: int = 4, device: torch.device | None = None) -> list[int]:
    layers = get_module(model, arch.layers)
    flag = {"m": None}

    def hook(_m, _inp, out):
        h = out[0] if isinstance(out, (tuple, list)) else out
        r = token_ratio(h) > ratio
        flag["m"] = r if flag["m"] is None else flag["m"] | r

    seen, hits = Counter(), Counter()
    handles = [layer.register_forward_hook(hook) for layer in layers]
    try:
        for i in range(0, len(batches), batch_size):
            ids = batches[i: i + batch_size]
            flag["m"] = None
            run_batches(model, ids, batch_size, device)
            body, m = ids[:, 1:].reshape(-1).tolist(), flag["m"][:, 1:].reshape(-1).cpu().tolist()  # position 0 apart
            seen.update(body)
            hits.update(t for t, f in zip(body, m) if f)
    finally:
        for h in handles:
            h.remove()
    return sorted(t for t, n in hits.items() if seen[t] >= 2 and n / seen[t] >= min_freq)


@dataclass
class TokenState:
    """Kept positions of the current forward: model-wide, and per decoder layer in dynamic mode."""

    mask: torch.Tensor | None = None  # [B, T]
    layer_masks: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass
class KeepTokens:
    state: TokenState
    layer: int | None = None
    kind: str = "tokens"

    def mask(self, x: torch.Tensor) -> torch.Tensor | None:
        m = self.state.layer_masks.get(self.layer, self.state.mask)
        if m is None or x.dim() != 3 or tuple(m.shape) != tuple(x.shape[:2]):
            return None
        return m[..., None]  # [B, T, 1]

    def side_bits(self) -> float:
        return 0.0  # the model-level id table is counted once in Effects.side_bits


def install(model: nn.Module, ids: torch.Tensor, first_token: bool, dynamic_ratio: float | None, arch,
            state: TokenState) -> list:
    """Register the hooks that compute the kept positions per forward; returns their handles."""
    def model_hook(_m, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        state.layer_masks.clear()
        if input_ids is None:
            state.mask = None
            return
        mask = torch.isin(input_ids, ids.to(input_ids.device))  # [B, T]
        if first_token:
            mask[:, 0] = True
        state.mask = mask

    handles = [model.register_forward_pre_hook(model_hook, with_kwargs=True)]
    if dynamic_ratio is not None:
        def layer_hook(i: int):
            def fn(_layer, args, kwargs):
                h = args[0] if args else kwargs["hidden_states"]
                if state.mask is not None:
                    state.layer_masks[i] = state.mask | (token_ratio(h) > dynamic_ratio)
            return fn
        handles += [lay.register_forward_pre_hook(layer_hook(i), with_kwargs=True)
                    for i, lay in enumerate(get_module(model, arch.layers))]
    return handles


def _layer_of(name: str, layers_path: str) -> int | None:
    rest = name[len(layers_path) + 1:] if name.startswith(layers_path + ".") else ""
    head = rest.split(".", 1)[0]
    return int(head) if head.isdigit() else None


@MITIGATIONS.register("outlier_tokens")
class OutlierTokens(Mitigation):
    name = "outlier_tokens"
    needs = ("activations", "arch")
    changes_weights = False

    class Options(Options):
        first_token: bool = True
        ids: list[int] | Literal["calibrate"] = "calibrate"
        ratio: float = Field(64.0, gt=1)
        min_freq: float = Field(0.5, gt=0, le=1)
        calib_samples: int = Field(8, ge=1)
        dynamic: bool = False

    def calibrate(self, model: nn.Module, ctx: QuantContext, opts: Options) -> torch.Tensor:
        if opts.ids != "calibrate":
            return torch.tensor([int(t) for t in opts.ids], dtype=torch.long)
        key = ("outlier_ids", ctx.upstream, opts.ratio, opts.min_freq, opts.calib_samples)
        ids = ctx.calib.memo(key, lambda: find_outlier_ids(model, ctx.calib.subset(opts.calib_samples), ctx.arch,
                                                           opts.ratio, opts.min_freq, ctx.batch_size, ctx.device),
                             "outlier token ids")
        return torch.tensor(ids, dtype=torch.long)

    def apply(self, model: nn.Module, ids: torch.Tensor, ctx: QuantContext, opts: Options) -> Effects:
        state = TokenState()
        handles = install(model, ids, opts.first_token, opts.ratio if opts.dynamic else None, ctx.arch, state)
        eff = Effects(hooks=handles, side_bits=32.0 * len(ids),
                      notes={"outlier_token_ids": ids.tolist()[:32]})
        for name, lp in ctx.plan.linears.items():
            if lp.activations is not None:
                layer = _layer_of(name, ctx.arch.layers) if opts.dynamic else None
                eff.keep[name] = [KeepTokens(state, layer)]
        return eff
