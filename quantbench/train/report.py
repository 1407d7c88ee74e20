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
    lines += _table(["variant", "FP ppl"] + recipes, rows) + ["", "## Plots", ""]
    lines += [f"![{p}]({p})" for p in plots] + ["", _NOTES]
    path.write_text("\n".join(lines) + "\n")


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
