"""Where error enters: per-layer output error and attention-sink drift against the FP model.

Protocol: one small probe batch (the first evaluation window(s)). The FP model runs once with
forward hooks that keep each decoder layer's output for that batch only ([B, T, D] per layer,
about 35 MB for 30 layers x 512 tokens x 576 dims in fp32) and the attention mass every layer
puts on the first key. Each variant then runs on the same batch; its hooks compare layer
outputs on the fly, so nothing else is stored.

- layer relative error: mean over tokens of ||h_q - h_fp||^2 / ||h_fp||^2 (per-token
  normalisation, so the few massive-activation tokens do not hide the error of the others).
- sink mass: mean over heads and queries (after the first) of the attention probability on key 0
  (the "attention sink" of An et al. 2025); drift = variant minus FP, averaged over layers.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..core.hooks import eager_attention, first_tensor, forward_hooks
from ..modeling.arch import arch_of, decoder_layers, get_module


@dataclass
class LayerProbe:
    """The FP side of the probe: its input ids, each layer's output and first-key attention mass."""

    ids: torch.Tensor  # [B, T]
    outputs: list[torch.Tensor] = field(default_factory=list)  # per layer [B, T, D], CPU fp32
    sink: list[float | None] = field(default_factory=list)  # per layer


@dataclass
class LayerDrift:
    rel_error: list[float]  # per layer
    sink: list[float | None]  # per layer, this variant
    sink_drift: float | None  # mean over layers of (variant - FP) first-key mass

    def summary(self) -> dict[str, float | int | str | None]:
        """Scalar columns: max and last-layer error, the layer where error grows most (entry), the two
        largest jumps as 'layer:+increase', and the sink drift."""
        errs = self.rel_error
        if not errs:
            return {"layer_err_max": None, "layer_err_worst": None, "layer_err_jumps": None,
                    "layer_err_last": None, "sink_drift": self.sink_drift}
        inc = [e - (errs[i - 1] if i else 0.0) for i, e in enumerate(errs)]  # growth over the previous layer
        top = sorted(range(len(inc)), key=inc.__getitem__, reverse=True)[:2]
        return {"layer_err_max": max(errs), "layer_err_worst": top[0],
                "layer_err_jumps": " ".join(f"{i}:+{inc[i]:.3g}" for i in top),
                "layer_err_last": errs[-1], "sink_drift": self.sink_drift}


def _sink_of(out) -> float | None:
    if isinstance(out, (tuple, list)) and len(out) > 1 and torch.is_tensor(out[1]):
        w = out[1].detach().float()  # [B, H, Tq, Tk]
        return w[:, :, 1:, 0].mean().item()
    return None


def _attn_pairs(model: nn.Module, sink: list[float | None]) -> list:
    arch = arch_of(model)

    def hook(i: int):
        def fn(_m, _inp, out):
            sink[i] = _sink_of(out)
        return fn

    return [(get_module(layer, arch.layer(i).attn), hook(i)) for i, layer in enumerate(decoder_layers(model))]


@torch.no_grad()
def capture_probe(model: nn.Module, ids: torch.Tensor, device: torch.device) -> LayerProbe:
    """Run the FP model on `ids` once and keep what the comparison needs."""
    layers = decoder_layers(model)
    probe = LayerProbe(ids=ids.cpu(), outputs=[torch.empty(0)] * len(layers), sink=[None] * len(layers))

    def keep(i: int):
        def fn(_m, _inp, out):
            probe.outputs[i] = first_tensor(out).detach().float().cpu()
        return fn

    pairs = [(layer, keep(i)) for i, layer in enumerate(layers)] + _attn_pairs(model, probe.sink)
    with eager_attention(model), forward_hooks(pairs):
        model(input_ids=ids.to(device))
    return probe


def _rel_error(h_q: torch.Tensor, h_fp: torch.Tensor) -> float:
    num = (h_q - h_fp).pow(2).sum(-1)  # [B, T]
    den = h_fp.pow(2).sum(-1).clamp_min(1e-12)  # [B, T]
    return (num / den).mean().item()


@torch.no_grad()
def compare_to_probe(model: nn.Module, probe: LayerProbe, device: torch.device,
                     basis: torch.Tensor | None = None) -> LayerDrift:
    """Run a variant on the probe batch; per-layer error and sink mass against the FP probe.
    basis: Q when the variant's residual stream lives in h @ Q (a rotation's Effects): undone here."""
    layers = decoder_layers(model)
    errs = [float("nan")] * len(layers)
    sink: list[float | None] = [None] * len(layers)

    def cmp(i: int):
        def fn(_m, _inp, out):
            h = first_tensor(out).detach().float().cpu()  # [B, T, D]
            if basis is not None:
                h = h @ basis.T.cpu()  # back to the FP basis (Q orthogonal)
            errs[i] = _rel_error(h, probe.outputs[i])
        return fn

    pairs = [(layer, cmp(i)) for i, layer in enumerate(layers)] + _attn_pairs(model, sink)
    with eager_attention(model), forward_hooks(pairs):
        model(input_ids=probe.ids.to(device))
    diffs = [q - f for q, f in zip(sink, probe.sink) if q is not None and f is not None]
    return LayerDrift(rel_error=errs, sink=sink, sink_drift=sum(diffs) / len(diffs) if diffs else None)
