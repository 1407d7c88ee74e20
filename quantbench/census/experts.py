"""Census entries for mixture-of-experts layers (tokens routed to each expert, its input outliers and
weight outliers) and the traced topology in words (what the census and the coverage matrix report)."""
from __future__ import annotations

from ..modeling.arch import ArchSpec


def topology_summary(arch: ArchSpec) -> dict:
    t = arch.layer(0)
    return {"family": arch.family, "norm_kind": arch.norm_kind, "tied_head": arch.tied, "embed_scale": arch.embed_scale,
            "heads": arch.n_heads, "kv_heads": arch.n_kv_heads, "head_dim": arch.head_dim,
            "parallel_block": t.parallel, "post_norms": list(t.post_norms), "fused_qkv": arch.fused_qkv,
            "experts_per_layer": len(t.experts), "routers": arch.names("routers"),
            "pairs": sorted({p.kind for lt in arch.layer_topos for p in lt.pairs}),
            "notes": sorted({n for lt in arch.layer_topos for n in lt.notes}) + list(arch.notes)}


def _ratio(inputs: dict, path: str) -> float | None:
    r = inputs.get(path)
    return r["ratio"] if r else None


def _wmax(weights: dict, layer: int, paths: list[str]) -> float | None:
    vals = [weights["layers"][layer][p]["max_over_mean"] for p in paths if p in weights["layers"][layer]]
    return max(vals) if vals else None


def expert_rows(arch: ArchSpec, col, inputs: list[dict], weights: dict) -> list[dict]:
    """Per MoE layer and expert: tokens routed (count and share of routing slots), the largest
    max/median of its gate/up and down inputs, and the largest max|W|/mean|W| of its linears."""
    out = []
    for i, st in enumerate(col.layers):
        t = arch.layer(i)
        for block, counts in st.routed.items():
            total = int(counts.sum())
            for e, n in enumerate(counts.tolist()):
                unit = f"{block}.{e}"
                lins = [p for p in (*t.up, *t.downs) if p.startswith(unit + ".")]
                first_in = next((p for p in lins if p in inputs[i]), None)
                down = next((p for p in t.downs if p.startswith(unit + ".")), None)
                out.append({"layer": i, "expert": unit, "tokens": int(n), "share": n / total if total else None,
                            "input_ratio": _ratio(inputs[i], first_in) if first_in else None,
                            "down_input_ratio": _ratio(inputs[i], down) if down else None,
                            "weight_max_over_mean": _wmax(weights, i, lins)})
    return out
