"""Minimal census: per decoder layer, the largest residual-stream magnitudes (dimension, token),
the median magnitude, their ratio, and the attention mass the first token receives.

Streaming: hooks reduce each layer's output to a few numbers as it is produced; no layer's
activations or attention maps are kept.
"""
from __future__ import annotations

from collections import defaultdict

import torch

from ..arch import arch_of, decoder_layers, get_module
from .hooks import eager_attention, first_tensor, forward_hooks


def _token_text(tokenizer, tok_id: int) -> str:
    return tokenizer.decode([tok_id]) if tokenizer is not None else str(tok_id)


@torch.no_grad()
def run_census(model, batches: torch.Tensor, tokenizer=None, top_k: int = 5, abs_threshold: float = 100.0,
               ratio_threshold: float = 1000.0, batch_size: int = 4) -> dict:
    """batches [N, T] token ids -> census dict (JSON-ready)."""
    arch = arch_of(model)
    layers = decoder_layers(model)
    device = next(model.parameters()).device
    top: dict[int, list] = defaultdict(list)  # layer -> [(value, dim, pos, token_id)]
    medians: dict[int, list] = defaultdict(list)
    sink: dict[int, list] = defaultdict(list)  # layer -> per-batch mean attention mass on key 0
    cur_ids: dict[str, torch.Tensor] = {}

    def res_hook(i):
        def fn(_m, _inp, out):
            h = first_tensor(out).detach().float().abs()  # [B, T, D]
            b, t, d = h.shape
            vals, idx = h.reshape(-1).topk(min(top_k, h.numel()))
            for v, j in zip(vals.tolist(), idx.tolist()):
                bi, rem = divmod(j, t * d)
                pos, dim = divmod(rem, d)
                top[i].append((v, dim, pos, int(cur_ids["ids"][bi, pos])))
            medians[i].append(h.median().item())
        return fn

    def attn_hook(i):
        def fn(_m, _inp, out):
            if isinstance(out, (tuple, list)) and len(out) > 1 and out[1] is not None:
                w = out[1].detach().float()  # [B, H, Tq, Tk]
                sink[i].append(w[:, :, 1:, 0].mean().item())  # queries after the first one
        return fn

    pairs = [(layer, res_hook(i)) for i, layer in enumerate(layers)]
    pairs += [(get_module(layer, arch.attn), attn_hook(i)) for i, layer in enumerate(layers)]
    with eager_attention(model), forward_hooks(pairs):
        for s in range(0, len(batches), batch_size):
            ids = batches[s: s + batch_size]
            cur_ids["ids"] = ids
            model(input_ids=ids.to(device))
    rows = []
    for i in range(len(layers)):
        best = sorted(top[i], reverse=True)[:top_k]
        med = float(torch.tensor(medians[i]).median())
        v, dim, pos, tok = best[0]
        rows.append({
            "layer": i, "max_abs": v, "dim": dim, "pos": pos, "token": _token_text(tokenizer, tok),
            "median_abs": med, "ratio": v / max(med, 1e-12),
            "outlier": bool(v > abs_threshold and v / max(med, 1e-12) > ratio_threshold),
            "top": [{"value": a, "dim": b, "pos": c, "token": _token_text(tokenizer, d)} for a, b, c, d in best],
            "first_token_attn": float(sum(sink[i]) / len(sink[i])) if sink[i] else None,
        })
    dims = sorted({r["dim"] for r in rows if r["outlier"]} | {t["dim"] for r in rows for t in r["top"]
                   if r["outlier"] and t["value"] > abs_threshold and t["value"] / max(r["median_abs"], 1e-12) > ratio_threshold})
    attn = [r["first_token_attn"] for r in rows if r["first_token_attn"] is not None]
    return {
        "thresholds": {"abs": abs_threshold, "ratio": ratio_threshold},
        "tokens": int(batches.numel()),
        "layers": rows,
        "summary": {
            "max_abs": max(r["max_abs"] for r in rows),
            "max_ratio": max(r["ratio"] for r in rows),
            "outlier_layers": [r["layer"] for r in rows if r["outlier"]],
            "outlier_dims": dims,
            "mean_first_token_attn": sum(attn) / len(attn) if attn else None,
        },
    }
