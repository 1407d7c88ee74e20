"""Why a linear matters, in the census's words (census.json: lifecycle, linear inputs, weights)."""
from __future__ import annotations

import re

_NAME = re.compile(r"^(.*)\.(\d+)\.(.+)$")  # <layers>.<i>.<layer-relative path>


def _split(name: str) -> tuple[int, str] | None:
    m = _NAME.match(name)
    return (int(m.group(2)), m.group(3)) if m else None


def census_reasons(name: str, census: dict | None) -> list[str]:
    """Census facts about linear `name`: writes / cancels a massive activation, reads an outlier input,
    holds standout weight columns. Empty when the census says nothing about it (or is missing)."""
    where = _split(name)
    if not census or where is None:
        return []
    i, rel = where
    out = []
    for r in census.get("lifecycle", []):
        peak = max(r.get("absmax_by_layer") or [0.0])
        if r["emerges"] == i and r["writer"]["path"] == rel:
            out.append(f"it writes the massive activation of dimension {r['dim']} (|x| up to {peak:.0f})")
        c = r.get("canceller")
        if c and r.get("disappears") == i and c["path"] == rel:
            verb = "cancels" if c.get("cancels") else "ends"
            out.append(f"it {verb} the massive activation of dimension {r['dim']} (written in layer {r['emerges']})")
    inputs = census.get("linear_inputs") or []
    if i < len(inputs):
        for site in inputs[i].values():
            if rel in site.get("reads", []) and site.get("outlier"):
                dims = ", ".join(str(d["dim"]) for d in site.get("outlier_dims", [])[:3])
                out.append(f"its input reaches {site['max_abs']:.0f} ({site['ratio']:.0f}x the median)"
                           + (f" in dimension(s) {dims}" if dims else ""))
    layers = (census.get("weights") or {}).get("layers") or []
    w = layers[i].get(rel) if i < len(layers) else None
    if w and w.get("n_outlier_cols"):
        out.append(f"its weight has {w['n_outlier_cols']} standout column(s) (max|W| {w['max_over_mean']:.0f}x mean|W|)")
    return out


def census_linked(name: str, census: dict | None) -> bool:
    return bool(census_reasons(name, census))
