"""Shared helpers for mitigations: weight views, in-place scaling, smoothable pairs, streaming
input statistics (per-channel absmax, Gram matrices XᵀX) collected with hooks that are always removed.

Weights are handled as [out, in] ("Linear layout"); GPT-2's Conv1D stores [in, out] and is
transposed on the way in and out.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn as nn

from ...arch import ArchSpec, decoder_layers, get_module
from ...errors import QuantbenchError


def is_conv1d(mod: nn.Module) -> bool:
    return type(mod).__name__ == "Conv1D"


def is_linear(mod: nn.Module) -> bool:
    return isinstance(mod, nn.Linear) or is_conv1d(mod)


def get_weight(mod: nn.Module) -> torch.Tensor:
    """A float32 copy of the weight in [out, in] layout."""
    w = mod.weight.data
    return (w.t() if is_conv1d(mod) else w).float().clone()


def set_weight(mod: nn.Module, w: torch.Tensor) -> None:
    """Write an [out, in] weight back (in the module's own layout and dtype)."""
    w = w.t() if is_conv1d(mod) else w
    mod.weight.data.copy_(w.to(mod.weight.dtype))


def in_features(mod: nn.Module) -> int:
    return mod.weight.shape[0] if is_conv1d(mod) else mod.weight.shape[1]


def scale_in(mod: nn.Module, s: torch.Tensor) -> None:
    """W[:, j] *= s[j] (the module's input channel j)."""
    w = get_weight(mod)  # [out, in]
    set_weight(mod, w * s.to(w)[None, :])


def scale_out(mod: nn.Module, s: torch.Tensor) -> None:
    """W[i, :] *= s[i] and b[i] *= s[i] (the module's output channel i; works for norms: weight [D])."""
    if mod.weight.dim() == 1:
        mod.weight.data.mul_(s.to(mod.weight))
    else:
        w = get_weight(mod)  # [out, in]
        set_weight(mod, w * s.to(w)[:, None])
    if getattr(mod, "bias", None) is not None:
        mod.bias.data.mul_(s.to(mod.bias))


@dataclass
class Pair:
    """prev -> targets: an op whose output channels feed every target's input channels.

    kv_groups: for v -> o under grouped-query attention, prev has n_kv*hd outputs and each target
    n_heads*hd inputs; target scales are prev scales repeated per query head (see expand).
    """

    key: str  # e.g. "layers.3.down"
    kind: str  # qkv | up | down | o
    prev: nn.Module
    targets: list[tuple[str, nn.Module]]
    rep: int = 1  # query heads per kv head (v -> o only)
    head_dim: int = 0

    def expand(self, s: torch.Tensor) -> torch.Tensor:
        """prev-channel scales [n_kv*hd] -> target-input scales [n_heads*hd]."""
        if self.rep == 1:
            return s
        return s.reshape(-1, 1, self.head_dim).expand(-1, self.rep, -1).reshape(-1)  # [kv, rep, hd] -> flat

    def reduce(self, v: torch.Tensor, how: str = "max") -> torch.Tensor:
        """target-input statistic [n_heads*hd] -> per prev channel [n_kv*hd] (max or mean over the group)."""
        if self.rep == 1:
            return v
        g = v.reshape(-1, self.rep, self.head_dim)  # [kv, rep, hd]
        return (g.amax(1) if how == "max" else g.mean(1)).reshape(-1)


def _gqa(model: nn.Module) -> tuple[int, int]:
    cfg = model.config
    heads = getattr(cfg, "num_attention_heads", None)
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return heads // kv, hd


def find_pairs(model: nn.Module, arch: ArchSpec | None, kinds: tuple[str, ...] = ("qkv", "up", "down", "o"),
               notes: list[str] | None = None) -> list[Pair]:
    """The arch's smoothable pairs in every decoder layer, filtered by kind; skipped ones noted."""
    if arch is None:
        raise QuantbenchError("this mitigation needs architecture knowledge; the model is not in quantbench.arch.ARCHS")
    kind_of = {arch.attn_norm: "qkv", arch.mlp_norm: "up", arch.up[-1]: "down", arch.qkv[-1]: "o"}
    rep, hd = _gqa(model)
    pairs = []
    layers = get_module(model, arch.layers)
    for i, layer in enumerate(layers):
        for prev_path, tgt_paths in arch.smooth_pairs:
            kind = kind_of[prev_path]
            if kind not in kinds:
                continue
            prev = get_module(layer, prev_path)
            targets = [(f"{arch.layers}.{i}.{p}", get_module(layer, p)) for p in tgt_paths]
            if not all(is_linear(m) for _, m in targets) or (kind in ("down", "o") and not is_linear(prev)):
                if notes is not None:
                    notes.append(f"layers.{i}.{kind}: skipped (a wrapped module sits between the pair)")
                continue
            pairs.append(Pair(f"layers.{i}.{kind}", kind, prev, targets,
                              rep=rep if kind == "o" else 1, head_dim=hd))
    return pairs


@contextmanager
def input_hooks(mods: dict[str, nn.Module], fn: Callable[[str, torch.Tensor], None],
                skip_first: int = 0) -> Iterator[dict[str, str]]:
    """fn(name, x[N, D]) on every call's input of each module; hooks removed on exit, even on error.

    skip_first drops the first positions of every sequence (e.g. the BOS/attention-sink token, whose
    massive activations would otherwise dominate Gram matrices). Modules called back to back on the very same input tensor (q/k/v, gate/up) are reported once,
    under the first name; `aliases` (returned through the context) maps the others to it.
    """
    handles = []
    last: dict[str, object] = {"x": None, "name": None}
    aliases: dict[str, str] = {}

    def make(name: str):
        def hook(_m, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            if x is last["x"]:
                aliases[name] = last["name"]
                return
            last["x"], last["name"] = x, name
            xs = x.detach()[:, skip_first:] if skip_first and x.dim() == 3 else x.detach()  # drop leading positions
            fn(name, xs.reshape(-1, x.shape[-1]).float())  # [B, T, D] -> [N, D]
        return hook

    try:
        for name, mod in mods.items():
            handles.append(mod.register_forward_pre_hook(make(name), with_kwargs=True))
        yield aliases
    finally:
        last["x"] = None
        for h in handles:
            h.remove()


@torch.no_grad()
def run_model(model: nn.Module, batches: torch.Tensor, batch_size: int, device: torch.device) -> None:
    for i in range(0, len(batches), batch_size):
        model(input_ids=batches[i: i + batch_size].to(device))


@torch.no_grad()
def input_stats(model: nn.Module, mods: dict[str, nn.Module], batches: torch.Tensor, ctx, gram: bool = False,
                sample_tokens: int = 0, skip_first: int = 0, token_norm: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    """Per module input: absmax [D], absmean [D], n; gram=True adds XᵀX [D, D] (float64), with
    token_norm each token's row scaled to unit RMS first (no token dominates XᵀX);
    sample_tokens > 0 adds `sample` [<= sample_tokens, D]: rows evenly spaced over all calibration tokens."""
    stats: dict[str, dict[str, torch.Tensor]] = {}
    step = max(1, -(-batches.numel() // sample_tokens)) if sample_tokens else 0

    def acc(name: str, x: torch.Tensor) -> None:
        d = x.shape[1]
        s = stats.setdefault(name, {"absmax": torch.zeros(d), "abssum": torch.zeros(d, dtype=torch.float64),
                                    "n": torch.zeros((), dtype=torch.float64), "rows": []})
        xc = x.cpu()
        s["absmax"] = torch.maximum(s["absmax"], xc.abs().amax(0))
        s["abssum"] += xc.abs().sum(0, dtype=torch.float64)
        s["n"] += xc.shape[0]
        if gram:
            xg = xc / xc.pow(2).mean(1, keepdim=True).sqrt().clamp_min(1e-12) if token_norm else xc  # [N, D]
            g = (xg.T @ xg).double()  # [D, D], fp32 matmul per batch, fp64 accumulation
            s["gram"] = s["gram"] + g if "gram" in s else g
        if step:
            s["rows"].append(xc[::step].clone())  # [N / step, D]

    with input_hooks(mods, acc, skip_first) as aliases:
        run_model(model, batches, ctx.batch_size, ctx.device)
    for s in stats.values():
        s["absmean"] = (s["abssum"] / s["n"].clamp_min(1)).float()
        rows = s.pop("rows")
        if rows:
            s["sample"] = torch.cat(rows)[:sample_tokens]
    for name, first in aliases.items():
        stats[name] = stats[first]
    return stats


def layers_of(model: nn.Module, arch: ArchSpec) -> nn.ModuleList:
    return get_module(model, arch.layers) if arch is not None else decoder_layers(model)


def require(recipe, what: str, mitigation: str) -> None:
    """Raise a one-line error when the recipe lacks the quantizer a mitigation works on."""
    if getattr(recipe, what) is None:
        raise QuantbenchError(f"recipe '{recipe.name}': {mitigation} needs {what} quantization ({what}: ...)")


def require_arch(model: nn.Module, mitigation: str) -> ArchSpec:
    from ...arch import arch_of

    try:
        return arch_of(model)
    except QuantbenchError as e:
        raise QuantbenchError(f"{mitigation}: {e}") from None


def calib_subset(batches: torch.Tensor, opts: dict, default: int) -> torch.Tensor:
    """The first `calib_samples` calibration sequences (mitigation option), [n, T]."""
    n = int(opts.get("calib_samples", default))
    return batches[: max(1, n)]
