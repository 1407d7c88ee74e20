"""Bigram-Backcopy probe (Guo et al. 2024): the three extreme-token phenomena measured on held-out BB
sequences, per decoder layer, plus the loss split by position type.

- attention sink: the attention mass on BOS (key 0), mean over heads and over queries 1..T-1, separately
  for queries whose token is a trigger (the head should be *active*: read the token before it) and for
  the others (*dormant*: park the mass on BOS). Per head too. `kv_bias` returns weights without its bias
  column (mass on real tokens), so its slot mass (1 − row sum) is reported separately; `sigmoid` and
  `clipped_softmax` weights are unnormalised / clipped (rows need not sum to 1).
- residual-state peak: the L2 norm of BOS's residual stream after each layer over the median norm of the
  other tokens (the same sequences), and max |x| on BOS against max |x| anywhere else.
- value-state drain: the L2 norm of BOS's value state (v_proj output) over the median of the other tokens.
- how the other variants switch a head off: the row mass (sum of the weights over real keys; 1 for
  softmax, less where `kv_bias` uses its slot or `clipped_softmax`/`sigmoid` leave mass out) and, for
  `ca_scale` and `gated`, the per-token factor on the head output (S_c in (0, 2), the gate in (0, 1)),
  each split by trigger and non-trigger queries.
- loss: mean next-token NLL at trigger positions (copy), at the other positions (bigram, position 0
  excluded) and overall, next to the true model's (oracle) NLL on the same tokens.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.hooks import eager_attention, first_tensor, forward_hooks
from .data import BigramBackcopy


def _mean(x: torch.Tensor, m: torch.Tensor) -> float | None:
    """Mean of x over the positions where m is True (None if none)."""
    return float(x[m].mean()) if bool(m.any()) else None


@torch.no_grad()
def bb_probe(model: nn.Module, ids: torch.Tensor, task: BigramBackcopy) -> dict:
    """ids [N, T] BOS-first held-out sequences -> JSON-ready dict (see the module docstring)."""
    layers = model.model.layers
    variant = getattr(model.config, "attention", None)
    res: list[torch.Tensor | None] = [None] * len(layers)
    attn: list[torch.Tensor | None] = [None] * len(layers)
    vals: list[torch.Tensor | None] = [None] * len(layers)
    factor: list[torch.Tensor | None] = [None] * len(layers)  # ca_scale / gated: [N, T, H] head factor

    def keep(store: list, i: int, which: int | None):
        def fn(_m, _inp, out):
            store[i] = (out[which] if which is not None else first_tensor(out)).detach().float()
        return fn

    pairs = []
    for i, layer in enumerate(layers):
        pairs += [(layer, keep(res, i, None)), (layer.self_attn, keep(attn, i, 1)),
                  (layer.self_attn.v_proj, keep(vals, i, None))]
        for name, fn in (("scale_proj", lambda z: 2 * torch.sigmoid(z)), ("gate_proj", torch.sigmoid)):
            mod = getattr(layer.self_attn, name, None)
            if isinstance(mod, nn.Module):
                pairs.append((mod, _factor_hook(factor, i, fn)))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with eager_attention(model), forward_hooks(pairs):
            logits = model(input_ids=ids.to(device)).logits.float().cpu()  # [N, T, V]
    finally:
        model.train(was_training)
    trig = task.trigger_mask(ids)  # [N, T]
    q_trig, q_other = trig[:, 1:], ~trig[:, 1:]  # queries 1..T-1
    rows = []
    for i in range(len(layers)):
        w = attn[i].cpu()  # [N, H, T, T]
        bos = w[:, :, 1:, 0]  # [N, H, T-1] mass on BOS per head and query
        h = bos.shape[1]
        qt, qo = q_trig[:, None, :].expand_as(bos), q_other[:, None, :].expand_as(bos)
        row = {"layer": i,
               "bos_attn": float(bos.mean()),
               "bos_attn_trigger": _mean(bos, qt), "bos_attn_other": _mean(bos, qo),
               "bos_attn_other_by_head": [_mean(bos[:, j], q_other) for j in range(h)],
               "bos_attn_trigger_by_head": [_mean(bos[:, j], q_trig) for j in range(h)]}
        mass = w[:, :, 1:, :].sum(-1)  # [N, H, T-1] total weight on real keys
        row.update({"row_mass_trigger": _mean(mass, qt), "row_mass_other": _mean(mass, qo)})
        if variant == "kv_bias":
            slot = 1.0 - mass  # [N, H, T-1] mass on the learned bias slot
            row.update({"slot_attn": float(slot.mean()), "slot_attn_trigger": _mean(slot, qt),
                        "slot_attn_other": _mean(slot, qo)})
        if factor[i] is not None:
            f = factor[i].cpu()[:, 1:, :].transpose(1, 2)  # [N, T-1, H] -> [N, H, T-1]
            row.update({"head_factor_trigger": _mean(f, qt), "head_factor_other": _mean(f, qo)})
        x = res[i].cpu()  # [N, T, D] residual stream after layer i
        norm = x.norm(dim=-1)  # [N, T]
        med = norm[:, 1:].median(dim=1).values  # [N]
        v = vals[i].cpu().norm(dim=-1)  # [N, T]
        row.update({"bos_norm": float(norm[:, 0].mean()), "median_norm": float(med.mean()),
                    "bos_norm_ratio": float((norm[:, 0] / med.clamp_min(1e-12)).mean()),
                    "bos_max_abs": float(x[:, 0].abs().max()), "other_max_abs": float(x[:, 1:].abs().max()),
                    "bos_value_norm_ratio": float((v[:, 0] / v[:, 1:].median(dim=1).values.clamp_min(1e-12)).mean())})
        rows.append(row)
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view(ids.shape[0], -1)
    oracle = task.oracle_nll(ids).float()  # [N, T-1]
    pos = trig[:, :-1].clone()  # the target at position t+1 is a copy when token t is a trigger
    other = ~pos
    other[:, 0] = False  # position 0 (BOS -> first token) is neither
    loss = {"all": float(nll.mean()), "copy": _mean(nll, pos), "bigram": _mean(nll, other),
            "oracle_all": float(oracle.mean()), "oracle_copy": _mean(oracle, pos), "oracle_bigram": _mean(oracle, other),
            "copy_positions": int(pos.sum()), "bigram_positions": int(other.sum())}
    return {"sequences": int(ids.shape[0]), "seq_len": int(ids.shape[1]), "triggers": list(task.triggers),
            "variant": variant, "layers": rows, "loss": loss, "summary": _summary(rows)}


def _factor_hook(store: list, i: int, fn):
    """Keep fn(output) of a factor projection (scale_proj / gate_proj): [N, T, H]."""
    def hook(_m, _inp, out):
        store[i] = fn(out.detach().float())
    return hook


def _summary(rows: list[dict]) -> dict:
    """The largest per-layer values: where the sink and the peak are strongest."""
    best = max(rows, key=lambda r: r["bos_attn_other"] or 0.0)
    peak = max(rows, key=lambda r: r["bos_norm_ratio"])
    return {"max_bos_attn_other": best["bos_attn_other"], "max_bos_attn_other_layer": best["layer"],
            "bos_attn_trigger_at_that_layer": best["bos_attn_trigger"],
            "max_head_bos_attn_other": max(max((x or 0.0) for x in r["bos_attn_other_by_head"]) for r in rows),
            "max_bos_norm_ratio": peak["bos_norm_ratio"], "max_bos_norm_ratio_layer": peak["layer"],
            "min_bos_value_norm_ratio": min(r["bos_value_norm_ratio"] for r in rows),
            "max_slot_attn": max((r["slot_attn"] for r in rows if "slot_attn" in r), default=None)}
