"""Weight outliers (rows/columns whose max|W| stands out) and detection of weights that already
sit on a low-bit grid (e.g. a checkpoint that passed through GGUF Q4_1)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..modeling.prequant import dequantized_weight
from ..modeling.surgery import is_linear, weight_view

MAX_LISTED = 8  # rows/columns listed with their scores per module


def _standout(score: torch.Tensor, ratio: float) -> tuple[list[int], float]:
    """Indices whose score exceeds ratio x the median score, largest first; and the median."""
    med = float(score.median())
    idx = (score > ratio * med).nonzero().squeeze(1)
    idx = idx[score[idx].argsort(descending=True)]
    return idx.tolist(), med


@torch.no_grad()
def weight_outliers(w: torch.Tensor, ratio: float) -> dict:
    """w [out, in]. Column j score = max_i |W[i, j]| / mean|W|, row i score = max_j |W[i, j]| / mean|W|;
    a row/column stands out when its score exceeds `ratio` x the median score of its kind."""
    a = w.detach().float().abs()  # one matrix at a time; plain amax beats fused inf-norms on CPU
    mean = float(a.mean()) or 1e-12
    col = a.amax(0) / mean  # [in] max_i |W[i, j]| / mean|W|
    row = a.amax(1) / mean  # [out]
    cols, col_med = _standout(col, ratio)
    rows, row_med = _standout(row, ratio)
    return {
        "shape": list(w.shape), "max_over_mean": float(col.max()),
        "col_median_score": col_med, "row_median_score": row_med,
        "n_outlier_cols": len(cols), "n_outlier_rows": len(rows),
        "cols": cols, "rows": rows,  # every standout column / row, largest score first
        "top_cols": [{"index": j, "score": float(col[j])} for j in cols[:MAX_LISTED]],
        "top_rows": [{"index": i, "score": float(row[i])} for i in rows[:MAX_LISTED]],
    }


@torch.no_grad()
def distinct_per_block(w: torch.Tensor, block: int, max_blocks: int = 1024) -> torch.Tensor | None:
    """Number of distinct values in each block of `block` consecutive inputs (strided sample of rows).
    w [out, in] -> [n_blocks]; None when `block` does not divide the input size."""
    out_f, in_f = w.shape
    if in_f % block:
        return None
    per_row = in_f // block
    row_step = max(1, math.ceil(out_f * per_row / max_blocks))
    rows = w.detach()[::row_step]  # [out / row_step, in]
    blocks = rows.reshape(-1, block)  # [rows * in/block, block]
    s = blocks.sort(-1).values
    return (s.diff(dim=-1) != 0).sum(-1) + 1  # [n_blocks]


def prequant_verdict(per_module: dict[str, dict], block: int, max_levels: int) -> dict:
    """Model-level verdict from per-module distinct-value counts."""
    checked = {k: v for k, v in per_module.items() if v is not None}
    on_grid = [k for k, v in checked.items() if v["max_distinct"] <= max_levels]
    share = len(on_grid) / len(checked) if checked else 0.0
    worst = max((checked[k]["max_distinct"] for k in on_grid), default=None)
    bits = math.ceil(math.log2(worst)) if worst else None
    detected = share >= 0.5
    text = (f"weights already quantized: {len(on_grid)}/{len(checked)} linear layers have at most {worst} distinct "
            f"values per block of {block} (a ~{bits}-bit grid); weight-only results at matching group sizes "
            "will look better than on the original model" if detected else
            f"no low-bit grid found ({len(on_grid)}/{len(checked)} linear layers with <= {max_levels} distinct "
            f"values per block of {block})")
    return {"detected": detected, "block": block, "max_levels": max_levels, "share_of_linears": share,
            "grid_bits": bits if detected else None, "n_on_grid": len(on_grid), "n_checked": len(checked),
            "text": text}


@torch.no_grad()
def weight_census(model: nn.Module, layer_paths: list[str], ratio: float, block: int, max_levels: int) -> dict:
    """Every linear layer: weight outliers (decoder layers) and low-bit grid check (all linears)."""
    per_layer: list[dict[str, dict]] = [{} for _ in layer_paths]
    grid: dict[str, dict | None] = {}
    prefix = {p + ".": i for i, p in enumerate(layer_paths)}
    for name, mod in model.named_modules():
        if not is_linear(mod):
            continue
        w = dequantized_weight(mod)  # bitsandbytes modules hold packed codes: look at the weights they stand for
        w = weight_view(mod) if w is None else w
        nd = distinct_per_block(w, block)
        grid[name] = None if nd is None else {"mean_distinct": float(nd.float().mean()), "max_distinct": int(nd.max())}
        for p, i in prefix.items():
            if name.startswith(p):
                per_layer[i][name[len(p):]] = weight_outliers(w, ratio)
    return {"ratio_threshold": ratio, "layers": per_layer, "prequantized": {
        **prequant_verdict(grid, block, max_levels), "modules": grid}}
