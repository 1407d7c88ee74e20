"""From streaming statistics to findings: outlier positions, token classes, lifecycle and linkage."""
from __future__ import annotations

import unicodedata
from collections import Counter
from dataclasses import dataclass

import torch

from .activations import LayerStats

TOKEN_CLASSES = ("initial", "delimiter", "weak_semantic", "other")
FUNCTION_WORDS = frozenset(
    "a an the of to in on at by for from with as and or but nor so if is are was were be been am it its "
    "this that these those he she we they i you me him her us them his their our my your not no do does did "
    "has have had will would can could shall should may might must than then there here which who whom what "
    "when where while into onto over under up down out off about".split())


def token_class(text: str, pos: int) -> str:
    """initial (first position), delimiter (punctuation / whitespace / newline), weak_semantic
    (short function word) or other."""
    if pos == 0:
        return "initial"
    s = text.strip()
    if not s or all(unicodedata.category(c)[0] in "PZC" for c in s):
        return "delimiter"
    if s.lower() in FUNCTION_WORDS:
        return "weak_semantic"
    return "other"


@dataclass(frozen=True)
class Thresholds:
    abs_floor: float
    ratio: float

    def is_outlier(self, value: float, median: float) -> bool:
        return value > self.abs_floor and value > self.ratio * max(median, 1e-12)


def outlier_positions(layers: list[LayerStats], medians: list[float], th: Thresholds) -> dict[tuple[int, int], dict]:
    """(seq, pos) -> {dims, layers, max} over every residual element that passes both thresholds."""
    found: dict[tuple[int, int], dict] = {}
    for i, st in enumerate(layers):
        for r in st.residual.records:
            if th.is_outlier(r.value, medians[i]):
                e = found.setdefault((r.seq, r.pos), {"dims": set(), "layers": set(), "max": 0.0})
                e["dims"].add(r.dim)
                e["layers"].add(i)
                e["max"] = max(e["max"], r.value)
    return found


def class_shares(positions: dict[tuple[int, int], dict], text_of) -> dict:
    """Token class of each outlier position and the share of each class."""
    counts: Counter = Counter()
    tokens = []
    for (seq, pos), e in sorted(positions.items()):
        text = text_of(seq, pos)
        cls = token_class(text, pos)
        counts[cls] += 1
        tokens.append({"seq": seq, "pos": pos, "token": text, "class": cls, "dims": sorted(e["dims"]),
                       "layers": sorted(e["layers"]), "max_abs": e["max"]})
    n = sum(counts.values())
    return {"counts": {c: counts[c] for c in TOKEN_CLASSES},
            "shares": {c: (counts[c] / n if n else 0.0) for c in TOKEN_CLASSES}, "tokens": tokens}


def _writer(st: LayerStats, d: int, paths: tuple[str, str]) -> dict:
    """The module (attention o-proj or MLP down-proj) with the largest output at dim d in one layer."""
    a = float(st.attn_out.extreme[d]) if st.attn_out.extreme is not None else 0.0
    m = float(st.mlp_out.extreme[d]) if st.mlp_out.extreme is not None else 0.0
    if abs(m) >= abs(a):
        return {"module": "mlp", "path": st.mlp_out.writer_of(d) or paths[1], "output": m, "other_output": a,
                "column": int(st.mlp_out.column[d]), "column_share": float(st.mlp_out.share[d])}
    return {"module": "attention", "path": paths[0], "output": a, "other_output": m,
            "column": int(st.attn_out.column[d]), "column_share": float(st.attn_out.share[d])}


def lifecycle(layers: list[LayerStats], medians: list[float], dims: list[int], th: Thresholds,
              paths: tuple[str, str]) -> list[dict]:
    """Per outlier dim: emergence, persistence, disappearance layers and which module writes/cancels it."""
    absmax = torch.stack([st.residual.absmax for st in layers])  # [L, D]
    signed = torch.stack([st.residual.extreme for st in layers])  # [L, D]
    out = []
    for d in dims:
        traj = absmax[:, d].tolist()
        on = [i for i, v in enumerate(traj) if th.is_outlier(v, medians[i])]
        if not on:
            continue
        first, last = on[0], on[-1]
        gone = last + 1 if last + 1 < len(layers) else None
        row = {"dim": d, "emerges": first, "persists": on, "last": last, "disappears": gone,
               "absmax_by_layer": traj, "writer": _writer(layers[first], d, paths)}
        if gone is not None:
            c = _writer(layers[gone], d, paths)
            c["cancels"] = bool(c["output"] * float(signed[last, d]) < 0)
            row["canceller"] = c
        out.append(row)
    return out


def _share(hits: int, n: int) -> float | None:
    return hits / n if n else None


def linkage(life: list[dict], weights: dict, down_inputs: list[list[int]], down_path: str,
            positions: dict[tuple[int, int], dict], sinks: Counter) -> dict:
    """How activation outliers coincide with weight outliers and with attention sinks."""
    wl = weights["layers"]
    row_hit = sum(1 for r in life if r["dim"] in wl[r["emerges"]].get(r["writer"]["path"], {}).get("rows", []))
    any_down = sum(1 for r in life if any(r["dim"] in L.get(down_path, {}).get("rows", []) for L in wl))
    mlp = [r for r in life if r["writer"]["module"] == "mlp"]
    col_hit = sum(1 for r in mlp if r["writer"]["column"] in wl[r["emerges"]].get(down_path, {}).get("cols", []))
    chans = [(i, c) for i, cs in enumerate(down_inputs) for c in cs]
    chan_hit = sum(1 for i, c in chans if c in wl[i].get(down_path, {}).get("cols", []))
    sink_pos = set(sinks)
    pos_hit = sum(1 for p in positions if p in sink_pos)
    return {
        "dims": len(life),
        "dims_writer_row_outlier": _share(row_hit, len(life)),
        "dims_down_row_outlier_any_layer": _share(any_down, len(life)),
        "mlp_written_dims": len(mlp),
        "writer_column_outlier": _share(col_hit, len(mlp)),
        "down_input_outlier_channels": len(chans),
        "down_input_channels_col_outlier": _share(chan_hit, len(chans)),
        "outlier_positions": len(positions),
        "outlier_positions_that_are_sinks": _share(pos_hit, len(positions)),
        "sink_positions": len(sink_pos),
        "sink_positions_that_are_outliers": _share(sum(1 for p in sink_pos if p in positions), len(sink_pos)),
    }
