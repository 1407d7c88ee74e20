"""census.json, census.md and the census plots (matplotlib, Agg backend)."""
from __future__ import annotations

import json
from pathlib import Path

from .plots import PLOTS, write_plots


def _f(x, fmt: str = ".3g") -> str:
    return "n/a" if x is None else format(x, fmt)


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def _layer_table(c: dict) -> list[str]:
    lines = ["| layer | max abs | dim | pos | token | median | ratio | kurtosis | outlier dims | first-token attn | heads with first-token sink |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in c["layers"]:
        dims = ", ".join(str(d["dim"]) for d in r["outlier_dims"]) or "-"
        lines.append(f"| {r['layer']} | {r['max_abs']:.4g} | {r['dim']} | {r['pos']} | {json.dumps(r['token'])} | "
                     f"{r['median_abs']:.3g} | {r['ratio']:.3g} | {_f(r['kurtosis'])} | {dims} | "
                     f"{_f(r['first_token_attn'], '.2f')} | {_pct(r['heads_first_sink_share'])} |")
    return lines


def _lifecycle_lines(c: dict) -> list[str]:
    lines = []
    for r in c["lifecycle"]:
        w = r["writer"]
        col = f", column {w['column']} ({_pct(w['column_share'])} of it)" if w["module"] == "mlp" else ""
        gone = "persists to the last layer" if r["disappears"] is None else f"disappears at layer {r['disappears']}"
        if r.get("canceller"):
            k = r["canceller"]
            verb = "cancelled by" if k["cancels"] else "largest write there by"
            gone += f" ({verb} {k['module']} {k['path']}, output {k['output']:.4g})"
        lines.append(f"- dim {r['dim']}: emerges at layer {r['emerges']} (written by {w['module']} {w['path']}, "
                     f"output {w['output']:.4g}{col}); outlier in {len(r['persists'])} layers; {gone}")
    return lines or ["- no activation-outlier dimension"]


def _expert_lines(c: dict) -> list[str]:
    """Mixture-of-experts layers: tokens routed to each expert and its input / weight outliers."""
    rows = c.get("experts") or []
    if not rows:
        return []
    topo = c["model"].get("topology", {})
    lines = ["## Experts", f"Routers kept in high precision: {', '.join(topo.get('routers', [])) or 'none'}.", "",
             "| layer | expert | tokens routed | share | gate/up input max/median | down input max/median | "
             "weight max/mean (largest) |", "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['layer']} | {r['expert']} | {r['tokens']} | {_pct(r['share'])} | {_f(r['input_ratio'])} | "
              f"{_f(r['down_input_ratio'])} | {_f(r['weight_max_over_mean'])} |" for r in rows]
    return lines + [""]


def markdown(c: dict) -> str:
    s, th, lk, tc = c["summary"], c["thresholds"], c["linkage"], c["token_classes"]
    wmax, lmax = s["max_weight_ratio"], s["max_linear_input"]
    lines = [
        "# Outlier census", "",
        f"{c['model']['model_type']}, {c['model']['layers']} layers, hidden {c['model']['hidden']}; "
        f"{c['tokens']} tokens ({c['sequences']} x {c['seq_len']}); {c.get('seconds', 0):.1f}s.", "",
        f"Thresholds: activation outlier when |x| > {th['abs']:g} and |x| / layer median > {th['ratio']:g}; "
        f"weight row/column stands out at > {th['weight_ratio']:g} x the median row/column score; "
        f"attention sink when a key receives > {th['sink']:g} of a head's mass.", "",
        "## Findings",
        f"- Residual stream: max |x| {s['max_abs']:.4g} ({s['max_ratio']:.4g} x median); outlier layers "
        f"{s['outlier_layers'] or 'none'}; outlier dims {s['outlier_dims'] or 'none'}.",
        f"- Linear inputs: largest max/median {_f(lmax and lmax['ratio'])} at layer {lmax and lmax['layer']} "
        f"{lmax and lmax['module']}." if lmax else "- Linear inputs: not profiled.",
        f"- Weights: largest max|W|/mean|W| {_f(wmax and wmax['max_over_mean'])} at layer {wmax and wmax['layer']} "
        f"{wmax and wmax['module']}.",
        f"- Attention: mean first-token mass {_f(s['mean_first_token_attn'], '.2f')}; "
        f"{_pct(s['mean_heads_first_sink_share'])} of heads have a first-token sink (mean over layers).",
        f"- Outlier tokens: {s['outlier_positions']}; classes " +
        ", ".join(f"{k} {_pct(v)}" for k, v in tc["shares"].items()) + ".",
        f"- Linkage: {_pct(lk['dims_writer_row_outlier'])} of outlier dims are a standout row of the module that "
        f"writes them; {_pct(lk['writer_column_outlier'])} of MLP-written dims come from a standout down-proj column; "
        f"{_pct(lk['down_input_channels_col_outlier'])} of down-proj input outlier channels meet a standout column; "
        f"{_pct(lk['outlier_positions_that_are_sinks'])} of outlier positions are attention sinks.",
        f"- Pre-quantized weights: {c['prequantized']['text']}.", "",
        "## Weight outliers by module",
        "| module | max max/mean | at layer | layers with standout rows/cols | standout rows | standout cols |",
        "| --- | --- | --- | --- | --- | --- |",
        *(f"| {m} | {e['max_over_mean']:.3g} | {e['layer']} | {len(e['layers_with_standouts'])} | {e['standout_rows']} | "
          f"{e['standout_cols']} |" for m, e in s["weight_outliers_by_module"].items()), "",
        "## Lifecycle", *_lifecycle_lines(c), "",
        "## Outlier tokens", *(f"- seq {t['seq']} pos {t['pos']} {json.dumps(t['token'])}: {t['class']}, dims {t['dims']}, "
                               f"max {t['max_abs']:.4g}" for t in tc["tokens"][:20]), "",
        "## Residual stream per layer", *_layer_table(c), "",
        *_expert_lines(c),
        "Plots: " + ", ".join(PLOTS) + ". Every number: census.json (fields in docs/census.md).", ""]
    return "\n".join(lines)


def write_census(census: dict, out: Path, plots: bool = True) -> list[Path]:
    """Write census.json, census.md and (optionally) the plots into `out`; return the paths."""
    from ..core.fileio import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "census.json", out / "census.md"]
    atomic_write_text(paths[1], markdown(census))
    if plots:
        paths += write_plots(census, out)
    atomic_write_text(paths[0], json.dumps(census, indent=1, default=str))  # last: it marks the census done
    return paths
