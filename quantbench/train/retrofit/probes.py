"""Outlier probes along the retrofit run: the census (quantbench.census.run_census) on a few held-out
windows, reduced to per-layer rows, plus what the census does not keep: the first token's residual
value in fixed dimensions (507 and 247 on the default model) and the attention mass on a graft's slot."""
from __future__ import annotations

import torch
import torch.nn as nn

from ...census import run_census
from ...core.hooks import eager_attention, first_tensor, forward_hooks
from ...modeling.arch import decoder_layers
from ...run.config import CensusConfig
from .grafts import GraftedAttention


@torch.no_grad()
def first_token_dims(model: nn.Module, windows: torch.Tensor, dims: tuple[int, ...]) -> tuple[list[dict], list]:
    """Per decoder layer: mean over windows of x[:, 0, d] (signed) for each d in dims (residual stream after
    the layer), and the mean attention mass on a graft's slot (None without a slot), in one eager forward."""
    layers = decoder_layers(model)
    hidden = model.config.hidden_size
    keep = [d for d in dims if 0 <= d < hidden]
    vals: list[dict] = [{} for _ in layers]

    def hook(i: int):
        def fn(_m, _inp, out):
            x = first_tensor(out)[:, 0, :].float()  # [B, D] the first token's residual
            vals[i] = {str(d): float(x[:, d].mean()) for d in keep}
        return fn

    device = next(model.parameters()).device
    with eager_attention(model), forward_hooks([(m, hook(i)) for i, m in enumerate(layers)]):
        model(input_ids=windows.to(device), use_cache=False)
    slot = [layer.self_attn.last_slot_mass if isinstance(layer.self_attn, GraftedAttention) else None
            for layer in layers]
    return vals, slot


def _down_score(weights: dict) -> tuple[float | None, int | None]:
    w = weights.get("mlp.down_proj")
    if not w:
        return None, None
    top = w.get("top_cols") or [{}]
    return w["max_over_mean"], top[0].get("index")


def probe(model: nn.Module, windows: torch.Tensor, tokenizer, dims: tuple[int, ...], linear_inputs: bool,
          step: int) -> dict:
    """One probe record: per-layer max |x|, median, ratio, outlier flag, first-token attention, the
    first token's value in `dims`, slot mass, down_proj weight score; the census summary and lifecycle."""
    was_training = model.training
    model.eval()
    try:
        ccfg = CensusConfig(samples=len(windows), seq_len=windows.shape[1], linear_inputs=linear_inputs, plots=False)
        c = run_census(model, windows, tokenizer=tokenizer, cfg=ccfg, batch_size=len(windows))
        firsts, slot = first_token_dims(model, windows, dims)
    finally:
        model.train(was_training)
    rows = []
    for r, f, s, w in zip(c["layers"], firsts, slot, c["weights"]["layers"]):
        score, col = _down_score(w)
        rows.append({"layer": r["layer"], "max_abs": r["max_abs"], "median_abs": r["median_abs"], "ratio": r["ratio"],
                     "outlier": r["outlier"], "token": r["token"], "first_token_attn": r["first_token_attn"],
                     "first_token_dims": f, "slot_mass": s, "down_proj_max_over_mean": score, "down_proj_top_col": col})
    s = c["summary"]
    summary = {k: s.get(k) for k in ("max_abs", "max_ratio", "outlier_layers", "outlier_dims", "mean_first_token_attn",
                                     "mean_heads_first_sink_share")}
    slots = [x for x in slot if x is not None]
    summary["mean_slot_mass"] = sum(slots) / len(slots) if slots else None
    life = [{k: e.get(k) for k in ("dim", "emerges", "last", "disappears")} for e in c.get("lifecycle", [])]
    return {"step": step, "layers": rows, "summary": summary, "lifecycle": life, "thresholds": c["thresholds"]}
