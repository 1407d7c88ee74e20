"""Write the comparison: comparison.json (everything), comparison.csv (one row per variant),
comparison.md (tables, findings, plot links) and the PNG plots."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from .plots import plot_all

PREFIXQUANT_RATIO = 64.0  # PrefixQuant: a token is an outlier token when max/median > 64


def _f(x, fmt: str = "{:.3f}") -> str:
    return "—" if x is None else fmt.format(x)


def flat_row(s: dict, recipes: list[str]) -> dict:
    c, sw = s["census"], s["sweep"]
    row = {"variant": s["variant"], "n_params": s["n_params"], "steps": s["steps"], "tokens": s["tokens"],
           "train_seconds": s["train_seconds"], "final_train_loss": s["final_train_loss"],
           "final_heldout_loss": s["final_heldout_loss"], "heldout_ppl": s["heldout_ppl"]}
    for cv in s.get("convergence", []):
        row[f"steps_to_{cv['target']}"] = cv["steps"]
        row[f"tokens_to_{cv['target']}"] = cv["tokens"]
        row[f"speedup_{cv['target']}"] = cv["speedup"]
    row.update({"census_max_abs": c.get("max_abs"), "census_max_ratio": c.get("max_ratio"),
                "census_first_token_attn": c.get("first_token_attn"), "census_max_kurtosis": c.get("max_kurtosis"),
                "census_max_weight_ratio": c.get("max_weight_ratio"), "census_bias_slot_mass": c.get("bias_slot_mass"),
                "fp_ppl": sw.get("fp_ppl")})
    for r in recipes:
        row[f"dppl_pct_{r}"] = sw.get("recipes", {}).get(r, {}).get("delta_ppl_pct")
    bb = s.get("bb")
    if bb:
        lo = bb["loss"]
        row.update({"bb_loss": lo["all"], "bb_loss_copy": lo["copy"], "bb_loss_bigram": lo["bigram"],
                    "bb_oracle_loss": lo["oracle_all"], "bb_oracle_loss_bigram": lo["oracle_bigram"]})
        for r in bb["layers"]:
            i = r["layer"]
            row.update({f"bb_bos_attn_other_L{i}": r["bos_attn_other"], f"bb_bos_attn_trigger_L{i}": r["bos_attn_trigger"],
                        f"bb_bos_norm_ratio_L{i}": r["bos_norm_ratio"],
                        f"bb_bos_value_norm_ratio_L{i}": r["bos_value_norm_ratio"]})
            row[f"bb_row_mass_other_L{i}"] = r.get("row_mass_other")
            if "slot_attn" in r:
                row[f"bb_slot_attn_L{i}"] = r["slot_attn"]
            if "head_factor_other" in r:
                row[f"bb_head_factor_trigger_L{i}"] = r["head_factor_trigger"]
                row[f"bb_head_factor_other_L{i}"] = r["head_factor_other"]
    return row


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _findings(summaries: list[dict]) -> list[str]:
    with_c = [s for s in summaries if s["census"]]
    if not with_c:
        return ["- No census was run (sweep disabled)."]
    top = max(with_c, key=lambda s: s["census"]["max_ratio"] or 0)
    emerged = [s["variant"] for s in with_c if s["census"].get("outlier_layers")]
    prefix = [s["variant"] for s in with_c if (s["census"]["max_ratio"] or 0) > PREFIXQUANT_RATIO]
    bias = [s for s in with_c if s["census"].get("bias_slot_mass") is not None]
    out = [f"- `{s['variant']}`: mean attention mass on the learned bias slot {s['census']['bias_slot_mass']:.3f} "
           "(not counted in its first-token attention)." for s in bias]
    out += [f"- Largest residual-stream max/median: {top['census']['max_ratio']:.1f}× ({top['variant']}, "
           f"max |x| = {top['census']['max_abs']:.2f})."]
    if emerged:
        out.append(f"- Massive activations (|x| > census abs threshold and > ratio threshold × median) emerged in: "
                   f"{', '.join(emerged)}.")
    else:
        th = top["census"].get("thresholds") or {"abs": 100.0, "ratio": 1000.0}
        out.append("- **No massive activations emerged at this scale** in any variant (no layer passes the census "
                   f"thresholds |x| > {th['abs']:g} and > {th['ratio']:g}× median).")
    attn = [s for s in with_c if s["census"].get("first_token_attn") is not None]
    if attn:
        hi = max(attn, key=lambda s: s["census"]["first_token_attn"])
        lo = min(attn, key=lambda s: s["census"]["first_token_attn"])
        out.append(f"- First-token attention mass ranges from {lo['census']['first_token_attn']:.3f} ({lo['variant']}) "
                   f"to {hi['census']['first_token_attn']:.3f} ({hi['variant']}).")
    out.append(f"- Variants above PrefixQuant's outlier-token ratio ({PREFIXQUANT_RATIO:.0f}× median): "
               f"{', '.join(prefix) or 'none'}.")
    return out


def write_markdown(path: Path, summaries: list[dict], recipes: list[str], targets: list[float], ref: str,
                   plots: list[str]) -> None:
    lines = ["# Structural outlier elimination: variant comparison", "",
             f"Same data, seed, shape and budget for every variant; speed-ups are relative to `{ref}` "
             "(its steps to reach a held-out loss / the variant's; > 1 = faster).", "", "## Training", ""]
    head = ["variant", "params", "steps", "train s", "train loss", "held-out loss", "held-out ppl"]
    head += [f"steps→{t} (speed-up)" for t in targets]
    rows = []
    for s in summaries:
        conv = [f"{_f(c['steps'], '{:.0f}')} ({_f(c['speedup'], '{:.2f}×')})" for c in s.get("convergence", [])]
        rows.append([s["variant"], f"{s['n_params'] / 1e6:.2f}M", str(s["steps"]), f"{s['train_seconds']:.0f}",
                     _f(s["final_train_loss"]), _f(s["final_heldout_loss"]), _f(s["heldout_ppl"], "{:.1f}")] + conv)
    lines += _table(head, rows) + ["", "## Outlier census (final checkpoints)", ""]
    rows = [[s["variant"], _f(s["census"].get("max_abs"), "{:.2f}"), _f(s["census"].get("max_ratio"), "{:.1f}"),
             _f(s["census"].get("max_kurtosis"), "{:.1f}"), _f(s["census"].get("first_token_attn")),
             _f(s["census"].get("max_weight_ratio"), "{:.1f}")] for s in summaries]
    lines += _table(["variant", "max |x|", "max/median", "max kurtosis", "first-token attn", "max weight max/mean"],
                    rows) + [""] + _findings(summaries) + ["", "## Quantization sweep (Δppl vs each model's own FP)", ""]
    rows = [[s["variant"], _f(s["sweep"].get("fp_ppl"), "{:.2f}")] +
            [_f(s["sweep"].get("recipes", {}).get(r, {}).get("delta_ppl_pct"), "{:+.2f}%") for r in recipes]
            for s in summaries]
    lines += _table(["variant", "FP ppl"] + recipes, rows) + [""]
    if any(s.get("bb") for s in summaries):
        lines += _bb_section([s for s in summaries if s.get("bb")])
    lines += ["## Plots", ""]
    lines += [f"![{p}]({p})" for p in plots] + ["", _NOTES]
    path.write_text("\n".join(lines) + "\n")


SINK_MASS = 0.3  # the census's sink threshold: a head "sinks" when it puts more than this on one key


def _per_layer(bb: dict, key: str, fmt: str) -> str:
    return " / ".join(_f(r.get(key), fmt) for r in bb["layers"])


def _bb_section(summaries: list[dict]) -> list[str]:
    """Bigram-Backcopy probe: losses, BOS attention (dormant vs active queries), BOS residual and value norms."""
    n = len(summaries[0]["bb"]["layers"])
    ls = f"layer {'/'.join(str(i) for i in range(n))}"
    lines = ["## Bigram-Backcopy probe (held-out sequences; per layer)", "",
             "Attention mass on BOS from non-trigger queries (the head should be dormant: a sink parks it on BOS) "
             "and from trigger queries (active: it should read the token before the trigger); BOS's residual norm "
             "and value-state norm over the median of the other tokens (residual-state peak, value-state drain). "
             "Row mass: the weights' sum over real keys (1 for softmax; the rest went to kv_bias's slot or was "
             "clipped / left out). Head factor: ca_scale's S_c or gated's gate on the head output. "
             "Losses in nats: copy = targets after a trigger, bigram = the others; oracle = the true model.", ""]
    head = ["variant", "loss (oracle)", "copy loss", "bigram loss (oracle)", f"BOS attn, non-trigger ({ls})",
            f"BOS attn, trigger ({ls})", f"row mass, non-trigger ({ls})", f"head factor, trigger → non-trigger ({ls})",
            f"BOS norm / median ({ls})", f"BOS value norm / median ({ls})"]
    rows = []
    for s in summaries:
        bb, lo = s["bb"], s["bb"]["loss"]
        rows.append([s["variant"], f"{lo['all']:.3f} ({lo['oracle_all']:.3f})", _f(lo["copy"]),
                     f"{_f(lo['bigram'])} ({_f(lo['oracle_bigram'])})",
                     _per_layer(bb, "bos_attn_other", "{:.3f}") + _slot(bb, "slot_attn_other"),
                     _per_layer(bb, "bos_attn_trigger", "{:.3f}") + _slot(bb, "slot_attn_trigger"),
                     _per_layer(bb, "row_mass_other", "{:.3f}"), _factors(bb, "{:.3f}"),
                     _per_layer(bb, "bos_norm_ratio", "{:.1f}×"), _per_layer(bb, "bos_value_norm_ratio", "{:.2f}")])
    lines += _table(head, rows) + [""]
    sink = [s["variant"] for s in summaries if (s["bb"]["summary"]["max_head_bos_attn_other"] or 0) > SINK_MASS]
    lines.append(f"- Variants with a head that puts > {SINK_MASS} of its non-trigger queries' mass on BOS "
                 f"(a BOS sink): {', '.join(sink) or 'none'}.")
    peak = sorted(summaries, key=lambda s: -s["bb"]["summary"]["max_bos_norm_ratio"])
    lines.append("- Largest BOS residual norm / median over layers: " + ", ".join(
        f"{s['variant']} {s['bb']['summary']['max_bos_norm_ratio']:.1f}× (layer {s['bb']['summary']['max_bos_norm_ratio_layer']})"
        for s in peak) + ".")
    return lines + [""]


def _factors(bb: dict, fmt: str) -> str:
    """ca_scale / gated: the head factor on trigger → non-trigger queries per layer ("—" for the others)."""
    if not any("head_factor_other" in r for r in bb["layers"]):
        return "—"
    return " / ".join(f"{_f(r.get('head_factor_trigger'), fmt)} → {_f(r.get('head_factor_other'), fmt)}"
                      for r in bb["layers"])


def _slot(bb: dict, key: str, fmt: str = "{:.3f}") -> str:
    """kv_bias: the learned slot's mass per layer, after the BOS mass."""
    if not any(key in r for r in bb["layers"]):
        return ""
    return " (slot " + _per_layer(bb, key, fmt) + ")"


_NOTES = """## Notes
- Held-out loss: mean next-token NLL over the first held-out windows (BOS + context-1 tokens) of the
  corpus's evaluation text; the sweep's FP perplexity reads the same text with its own window length.
- Steps-to-reach interpolates linearly between held-out evaluations (every `optim.eval_every` steps).
- First-token attention: mean over layers, heads and queries of the attention mass on position 0 (BOS).
  `kv_bias`: the learned bias slot is dropped from the weights, so this is the mass on the first
  *real* token; `sigmoid`/`clipped_softmax`: the unnormalised / clipped weights (rows need not sum to 1).
- Per-tensor static W8A8 is the recipe most sensitive to activation outliers; W4A16 is weight-only."""


def write_comparison(out: Path, summaries: list[dict], recipes: list[str], targets: list[float], ref: str) -> Path:
    plots = plot_all(out, summaries, recipes)
    (out / "comparison.json").write_text(json.dumps({"reference": ref, "targets": targets, "recipes": recipes,
                                                     "variants": summaries}, indent=1, default=str))
    flat = [flat_row(s, recipes) for s in summaries]
    keys = list(dict.fromkeys(k for r in flat for k in r))
    with open(out / "comparison.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(flat)
    write_markdown(out / "comparison.md", summaries, recipes, targets, ref, plots)
    return out / "comparison.md"


def bb_outcome_table(comparison: dict) -> str:
    """The Bigram-Backcopy outcome table of docs/training.md, from a run's comparison.json (a test checks
    that the docs hold exactly this): per variant the BB probe (loss on every held-out sequence, next to the
    true model's; BOS attention, residual and value norms per layer), the census max/median and the sweep."""
    recipes = [r for r in ("w8a8-tensor-static", "w8a8-token", "w4a16-g64") if r in comparison["recipes"]]
    vs = [s for s in comparison["variants"] if s.get("bb")]
    n = len(vs[0]["bb"]["layers"]) if vs else 0
    ls = "/".join(f"L{i}" for i in range(n))
    head = ["variant", "held-out loss (oracle)", "copy loss", f"BOS attn, non-trigger queries ({ls})",
            f"BOS attn, trigger queries ({ls})", f"row mass, non-trigger ({ls})",
            f"head factor, trigger → non-trigger ({ls})", f"BOS norm / median ({ls})",
            f"BOS value norm / median ({ls})", "max/median \\|x\\|"] + [f"Δppl {r}" for r in recipes]
    rows = []
    for s in vs:
        bb, lo = s["bb"], s["bb"]["loss"]
        rows.append([f"`{s['variant']}`", f"{lo['all']:.3f} ({lo['oracle_all']:.3f})", _f(lo["copy"]),
                     _per_layer(bb, "bos_attn_other", "{:.2f}") + _slot(bb, "slot_attn_other", "{:.2f}"),
                     _per_layer(bb, "bos_attn_trigger", "{:.2f}") + _slot(bb, "slot_attn_trigger", "{:.2f}"),
                     _per_layer(bb, "row_mass_other", "{:.2f}"), _factors(bb, "{:.2f}"),
                     _per_layer(bb, "bos_norm_ratio", "{:.1f}"), _per_layer(bb, "bos_value_norm_ratio", "{:.2f}"),
                     _f(s["census"].get("max_ratio"), "{:.1f}")] +
                    [_dppl(s["sweep"]["recipes"].get(r, {})) for r in recipes])
    return "\n".join(_table(head, rows))


def _dppl(r: dict) -> str:
    """Δppl % with its paired 95% interval when the sweep gave one."""
    v, lo, hi = r.get("delta_ppl_pct"), r.get("delta_ppl_lo"), r.get("delta_ppl_hi")
    return _f(v, "{:+.2f}%") + (f" [{lo:+.2f}, {hi:+.2f}]" if lo is not None and hi is not None else "")
