"""The census: one streaming pass over the census batches (hooks), then the weight scan, then the
findings (token classes, lifecycle, linkage). Returns a JSON-ready dict; see docs/census.md."""
from __future__ import annotations

import time
from typing import Callable

import torch
import torch.nn as nn

from ..core.errors import UnsupportedArchitecture
from ..core.hooks import eager_attention, forward_hooks
from ..modeling.arch import arch_of, decoder_layers
from ..run.config import CensusConfig
from .activations import Collector, LayerStats
from .analysis import Thresholds, class_shares, lifecycle, linkage, outlier_positions
from .experts import expert_rows, topology_summary
from .stats import Record, SiteStats, finite
from .weights import weight_census


def _hidden_size(model: nn.Module) -> int:
    cfg = model.config
    for key in ("hidden_size", "n_embd", "d_model"):
        if isinstance(getattr(cfg, key, None), int):
            return getattr(cfg, key)
    raise UnsupportedArchitecture(f"cannot find the hidden size in {type(cfg).__name__} (hidden_size / n_embd / d_model)")


def _text_fn(batches: torch.Tensor, tokenizer) -> Callable[[int, int], str]:
    def text_of(seq: int, pos: int) -> str:
        tok = int(batches[seq, pos])
        return tokenizer.decode([tok]) if tokenizer is not None else str(tok)
    return text_of


def _rec(r: Record, text_of) -> dict:
    return {"value": r.value, "dim": r.dim, "seq": r.seq, "pos": r.pos, "token": text_of(r.seq, r.pos)}


def _site_row(site: SiteStats, th: Thresholds, text_of) -> dict:
    """Top-k, median, max/median, kurtosis and the dims (channels) that pass both thresholds."""
    med = site.median()
    top = sorted(site.top, key=lambda r: r.value, reverse=True)
    best = top[0]
    amax = site.absmax
    hit = ((amax > th.abs_floor) & (amax > th.ratio * max(med, 1e-12))).nonzero().squeeze(1)  # [n_hit]
    dims = hit[amax[hit].argsort(descending=True)].tolist()
    return {"max_abs": best.value, "dim": best.dim, "seq": best.seq, "pos": best.pos, "token": text_of(best.seq, best.pos),
            "median_abs": med, "ratio": best.value / max(med, 1e-12), "kurtosis": finite(site.kurtosis()),
            "outlier": th.is_outlier(best.value, med),
            "outlier_dims": [{"dim": d, "max_abs": float(amax[d]), "ratio": float(amax[d]) / max(med, 1e-12)} for d in dims],
            "top": [_rec(r, text_of) for r in top]}


def _attn_row(st: LayerStats) -> dict:
    a = st.attn
    if a is None or a.first_mass is None:
        return {"first_token_attn": None, "first_token_mass_by_head": None, "heads_first_sink_share": None,
                "other_max_mass_by_head": None}
    per_head = (a.first_mass / a.n_seqs).tolist()
    sink_share = (a.first_sink / a.n_seqs)  # [H] share of sequences where key 0 is a sink
    return {"first_token_attn": sum(per_head) / len(per_head), "first_token_mass_by_head": per_head,
            "heads_first_sink_share": float((sink_share >= 0.5).float().mean()),
            "other_max_mass_by_head": a.other_max.tolist()}


@torch.no_grad()
def _collect(model: nn.Module, batches: torch.Tensor, cfg: CensusConfig, batch_size: int) -> Collector:
    arch = arch_of(model)
    col = Collector(arch, decoder_layers(model), _hidden_size(model), cfg.top_k, cfg.abs_threshold,
                    cfg.max_records, cfg.sink_threshold, cfg.linear_inputs)
    device = next(model.parameters()).device
    with eager_attention(model), forward_hooks(col.pairs()):
        for s in range(0, len(batches), batch_size):
            ids = batches[s: s + batch_size]
            col.seq0, col.shape = s, tuple(ids.shape)
            model(input_ids=ids.to(device), use_cache=False)
    return col


def run_census(model: nn.Module, batches: torch.Tensor, tokenizer=None, cfg: CensusConfig | None = None,
               batch_size: int = 4) -> dict:
    """batches [N, T] token ids -> census dict (JSON-ready): activation, weight and attention outliers,
    token classes, lifecycle, linkage and the pre-quantized-weights check."""
    cfg = cfg or CensusConfig()
    t0 = time.perf_counter()
    arch = arch_of(model)
    col = _collect(model, batches, cfg, batch_size)
    th = Thresholds(cfg.abs_threshold, cfg.ratio_threshold)
    text_of = _text_fn(batches, tokenizer)
    rows = [{"layer": i, **_site_row(st.residual, th, text_of), **_attn_row(st)} for i, st in enumerate(col.layers)]
    medians = [r["median_abs"] for r in rows]
    inputs = [{p: {"reads": list(col.sites[i][p]), **_site_row(s, th, text_of)} for p, s in st.inputs.items() if s.n}
              for i, st in enumerate(col.layers)]
    n = len(col.layers)
    layer_paths = [f"{arch.layers}.{i}" for i in range(n)]
    weights = weight_census(model, layer_paths, cfg.weight_ratio, cfg.prequant_block, cfg.prequant_max_levels)
    positions = outlier_positions(col.layers, medians, th)
    dims = sorted({d for e in positions.values() for d in e["dims"]})
    down = arch.down or (arch.layer(0).mlp or "mlp")
    life = lifecycle(col.layers, medians, dims, th, (arch.o, down))
    down_in = [[c["dim"] for c in L[down]["outlier_dims"]] if down in L else [] for L in inputs]
    sinks = sum((st.attn.sinks for st in col.layers), start=type(col.layers[0].attn.sinks)())
    census = {
        "thresholds": {"abs": cfg.abs_threshold, "ratio": cfg.ratio_threshold, "weight_ratio": cfg.weight_ratio,
                       "sink": cfg.sink_threshold, "prequant_block": cfg.prequant_block,
                       "prequant_max_levels": cfg.prequant_max_levels, "top_k": cfg.top_k},
        "model": {"model_type": model.config.model_type, "layers": n, "hidden": _hidden_size(model),
                  "down_proj": arch.down, "o_proj": arch.o, "topology": topology_summary(arch)},
        "tokens": int(batches.numel()), "sequences": int(batches.shape[0]), "seq_len": int(batches.shape[1]),
        "layers": rows, "linear_inputs": inputs, "weights": {k: v for k, v in weights.items() if k != "prequantized"},
        "prequantized": weights["prequantized"],
        "token_classes": class_shares(positions, text_of),
        "lifecycle": life,
        "linkage": linkage(life, weights, down_in, down, positions, sinks),
        "experts": expert_rows(arch, col, inputs, weights),
    }
    census["summary"] = _summary(census, dims)
    census["seconds"] = time.perf_counter() - t0
    return census


def _summary(c: dict, dims: list[int]) -> dict:
    rows = c["layers"]
    attn = [r["first_token_attn"] for r in rows if r["first_token_attn"] is not None]
    sink = [r["heads_first_sink_share"] for r in rows if r["heads_first_sink_share"] is not None]
    lin = [(r["ratio"], i, p) for i, L in enumerate(c["linear_inputs"]) for p, r in L.items()]
    wmax = [(m["max_over_mean"], i, p) for i, L in enumerate(c["weights"]["layers"]) for p, m in L.items()]
    return {
        "max_abs": max(r["max_abs"] for r in rows),
        "max_ratio": max(r["ratio"] for r in rows),
        "outlier_layers": [r["layer"] for r in rows if r["outlier"]],
        "outlier_dims": dims,
        "outlier_positions": len(c["token_classes"]["tokens"]),
        "token_class_shares": c["token_classes"]["shares"],
        "mean_first_token_attn": sum(attn) / len(attn) if attn else None,
        "mean_heads_first_sink_share": sum(sink) / len(sink) if sink else None,
        "max_linear_input": dict(zip(("ratio", "layer", "module"), max(lin))) if lin else None,
        "max_weight_ratio": dict(zip(("max_over_mean", "layer", "module"), max(wmax))) if wmax else None,
        "weight_outliers_by_module": _by_module(c["weights"]["layers"]),
        "prequantized": c["prequantized"]["detected"],
        "linkage": c["linkage"],
    }


def _by_module(layers: list[dict[str, dict]]) -> dict[str, dict]:
    """Per module kind: the largest max|W|/mean|W|, its layer, and the layers holding standout rows/columns."""
    out: dict[str, dict] = {}
    for i, layer in enumerate(layers):
        for name, w in layer.items():
            e = out.setdefault(name, {"max_over_mean": 0.0, "layer": i, "layers_with_standouts": [],
                                      "standout_rows": 0, "standout_cols": 0})
            if w["max_over_mean"] > e["max_over_mean"]:
                e["max_over_mean"], e["layer"] = w["max_over_mean"], i
            if w["n_outlier_rows"] or w["n_outlier_cols"]:
                e["layers_with_standouts"].append(i)
            e["standout_rows"] += w["n_outlier_rows"]
            e["standout_cols"] += w["n_outlier_cols"]
    return out
