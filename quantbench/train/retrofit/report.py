"""The retrofit comparison: retrofit.json (everything), retrofit.csv (one row per variant),
retrofit.md (step-0 differences, training, outliers before/after, Δppl with intervals, findings) and plots.
A `<base>+penalty` variant (the base's graft trained with the outlier penalty) is one more row; its
folder names keep the `+` (a plain file name, and a legal run_id for its sweep)."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from ..report import _f, _table
from .config import split_variant
from .loop import RetrofitLog
from .plots import plot_all


def _sweep(rows: dict[str, dict]) -> dict:
    fp = rows.get("fp", {})
    keys = ("ppl", "delta_ppl_pct", "delta_ppl_lo", "delta_ppl_hi", "kl", "status", "reason")
    return {"fp_ppl": fp.get("ppl"),
            "recipes": {k: {c: r.get(c) for c in keys} for k, r in rows.items() if k != "fp"}}


def _peak_dims(p: dict) -> dict:
    """Largest |first-token value| over layers, per tracked dim."""
    out: dict[str, float] = {}
    for r in p["layers"]:
        for d, x in (r.get("first_token_dims") or {}).items():
            out[d] = max(out.get(d, 0.0), abs(x))
    return out


def _outliers(p: dict | None) -> dict:
    if not p:
        return {}
    s = p["summary"]
    return {"step": p["step"], "max_abs": s["max_abs"], "max_ratio": s["max_ratio"], "outlier_layers": s["outlier_layers"],
            "first_token_attn": s["mean_first_token_attn"], "slot_mass": s.get("mean_slot_mass"),
            "first_token_dims": _peak_dims(p), "layers": p["layers"]}


def _penalty(rlog: RetrofitLog, variant: str) -> dict:
    """The outlier penalty of the training batches: first step, mean of the last 10, and whether the
    variant trained on it (`+penalty`)."""
    pen = rlog.penalty
    return {"trained": split_variant(variant)[1], "first": pen[0][1] if pen else None,
            "last": sum(r[1] for r in pen[-10:]) / len(pen[-10:]) if pen else None}


def summary(variant: str, rlog: RetrofitLog, rows: dict[str, dict]) -> dict:
    last = rlog.train[-10:]
    held = rlog.heldout[-1][2]
    return {"variant": variant, "n_params": rlog.n_params, "trainable": rlog.trainable, "penalty": _penalty(rlog, variant),
            "steps": int(rlog.train[-1][0]), "tokens": int(rlog.train[-1][1]), "train_seconds": round(rlog.seconds, 1),
            "final_train_loss": sum(r[2] for r in last) / len(last), "heldout_loss_step0": rlog.heldout[0][2],
            "final_heldout_loss": held, "heldout_ppl": math.exp(held), "step0": rlog.step0,
            "curves": {"train": rlog.train, "heldout": rlog.heldout, "penalty": rlog.penalty}, "probes": rlog.probes,
            "before": _outliers(rlog.probes[0] if rlog.probes else None),
            "census": _outliers(rlog.probes[-1] if rlog.probes else None), "sweep": _sweep(rows)}


def _verdict(s: dict) -> str:
    """Removed / reduced / not, from the first and last probe (census thresholds)."""
    b, a = s["before"], s["census"]
    if not b or not a:
        return "not probed"
    if b["outlier_layers"] and not a["outlier_layers"]:
        state = "removed (no layer passes the massive-activation thresholds any more)"
    elif a["max_abs"] < 0.5 * b["max_abs"]:
        state = "reduced"
    else:
        state = "not removed"
    return (f"`{s['variant']}`: max |x| {b['max_abs']:.4g} → {a['max_abs']:.4g}, max/median {b['max_ratio']:.4g} → "
            f"{a['max_ratio']:.4g}, outlier layers {len(b['outlier_layers'])} → {len(a['outlier_layers'])}, first-token "
            f"attention {_f(b['first_token_attn'])} → {_f(a['first_token_attn'])}: {state}.")


def _dppl(r: dict) -> str:
    if r.get("delta_ppl_pct") is None:
        return r.get("status") or "—"
    ci = f" [{r['delta_ppl_lo']:+.1f}, {r['delta_ppl_hi']:+.1f}]" if r.get("delta_ppl_lo") is not None else ""
    return f"{r['delta_ppl_pct']:+.1f}%{ci}"


def _tables(summaries: list[dict], recipes: list[str], targets: list[float], pretrained: dict,
            penalty: dict | None = None) -> list[str]:
    lines = ["## Step 0: grafted vs pretrained logits (2 held-out windows)", ""]
    lines += _table(["variant", "max \\|Δlogit\\|", "mean \\|Δlogit\\|", "mean KL", "top-1 agreement", "held-out loss at step 0"],
                    [[s["variant"], _f(s["step0"].get("max_abs_logit_diff"), "{:.3g}"),
                      _f(s["step0"].get("mean_abs_logit_diff"), "{:.3g}"), _f(s["step0"].get("mean_kl"), "{:.3g}"),
                      _f(s["step0"].get("top1_agreement"), "{:.4f}"), _f(s["heldout_loss_step0"], "{:.4f}")]
                     for s in summaries])
    lines += ["", "## Training (same tokens, steps, learning rates and seed)", ""]
    head = ["variant", "trainable", "steps", "train s", "held-out loss", "held-out ppl"]
    head += [f"steps→{t} (speed-up)" for t in targets]
    kind = (penalty or {}).get("kind", "outlier")
    head += [f"{kind} penalty (train batch): step 1 → mean of last 10"]
    lines += _table(head, [[s["variant"], f"{sum(s['trainable'].values()) / 1e6:.2f}M", str(s["steps"]),
                            f"{s['train_seconds']:.0f}", _f(s["final_heldout_loss"]), _f(s["heldout_ppl"], "{:.2f}")]
                           + [f"{_f(c['steps'], '{:.0f}')} ({_f(c['speedup'], '{:.2f}×')})" for c in s["convergence"]]
                           + [_penalty_cell(s.get("penalty") or {})]
                           for s in summaries])
    if penalty and any((s.get("penalty") or {}).get("trained") for s in summaries):
        lines += ["", f"`+penalty` variants train on cross-entropy + {penalty['weight']:g} × {penalty['kind']} penalty "
                  f"(decoder layers {penalty['layers']}); the losses above are the cross-entropy alone. The penalty "
                  "column is each variant's training batches (every variant logs it; * = trained on it)."]
    lines += ["", "## Outliers: first probe (step 0) → last probe", ""]
    dims = sorted({d for s in summaries for d in (s["census"] or {}).get("first_token_dims", {})}, key=int)
    rows = []
    for s in summaries:
        b, a = s["before"] or {}, s["census"] or {}
        rows.append([s["variant"], f"{_f(b.get('max_abs'), '{:.4g}')} → {_f(a.get('max_abs'), '{:.4g}')}",
                     f"{_f(b.get('max_ratio'), '{:.4g}')} → {_f(a.get('max_ratio'), '{:.4g}')}",
                     f"{len(b.get('outlier_layers') or [])} → {len(a.get('outlier_layers') or [])}",
                     f"{_f(b.get('first_token_attn'))} → {_f(a.get('first_token_attn'))}", _f(a.get("slot_mass"), "{:.3g}")]
                    + [f"{_f(b.get('first_token_dims', {}).get(d), '{:.4g}')} → {_f(a.get('first_token_dims', {}).get(d), '{:.4g}')}"
                       for d in dims])
    lines += _table(["variant", "max \\|x\\|", "max/median", "outlier layers", "first-token attn", "slot mass"]
                    + [f"\\|x[0, {d}]\\| (max over layers)" for d in dims], rows)
    lines += ["", "## Quantization (Δppl vs the variant's own FP, paired 95% interval)", ""]
    srows = [["pretrained (untrained)", _f(pretrained.get("fp", {}).get("ppl"), "{:.2f}")]
             + [_dppl(pretrained.get(r, {})) for r in recipes]] if pretrained else []
    srows += [[s["variant"], _f(s["sweep"].get("fp_ppl"), "{:.2f}")] + [_dppl(s["sweep"]["recipes"].get(r, {}))
                                                                       for r in recipes] for s in summaries]
    if not recipes:
        return lines + ["(sweep disabled)"]
    why = [f"- `{s['variant']}` refuses `{r}`: {x['reason']}" for s in summaries
           for r, x in s["sweep"]["recipes"].items() if x.get("status") == "refused"]
    return lines + _table(["variant", "FP ppl"] + recipes, srows) + ([""] + why if why else [])


def _penalty_cell(p: dict) -> str:
    if p.get("first") is None:
        return "—"
    return f"{p['first']:.4g} → {p['last']:.4g}" + (" *" if p.get("trained") else "")


def write_markdown(path: Path, summaries: list[dict], recipes: list[str], targets: list[float], ref: str,
                   pretrained: dict, plots: list[str], penalty: dict | None = None) -> None:
    lines = ["# Retrofit: structural alternatives grafted onto a pretrained model", "",
             f"Every variant continues training from the pretrained weights on the same calibration tokens; "
             f"speed-ups are relative to `{ref}` (its steps to a held-out loss / the variant's; > 1 = faster).", ""]
    lines += _tables(summaries, recipes, targets, pretrained, penalty)
    lines += ["", "## Findings (computed from the probes above)", ""] + [f"- {_verdict(s)}" for s in summaries]
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots] + ["", _NOTES]
    path.write_text("\n".join(lines) + "\n")


_NOTES = """## Notes
- Step 0 compares the grafted model before any update with the pretrained model on the same windows;
  `softmax_plus_one` cannot start function-preserving, `kv_bias` starts with its slot logit at
  `grafts.sink_logit_init` (close, not exact). The control's row is 0 by construction.
- Probes: the census (quantbench.census) on `probe.windows` held-out windows; max |x| and max/median are
  the residual stream's, first-token attention is the mean mass on position 0 (for slot grafts, on the
  first real token; the slot's own mass is the `slot mass` column); |x[0, d]| is the first token's value.
- Held-out loss and the sweep's perplexity read the evaluation text; training reads only calibration text.
- Outlier penalty (quantbench.train.retrofit.config.PenaltyConfig): kurtosis = mean over layers and tokens of
  E[(h − μ)^4]/σ^4 over the hidden dimension (3 for a Gaussian); max = mean over layers of max |h| / RMS(h).
  h = the chosen decoder layers' outputs (the residual stream)."""


def write_report(out: Path, summaries: list[dict], recipes: list[str], targets: list[float], ref: str,
                 pretrained: dict, penalty: dict | None = None) -> Path:
    """`penalty`: the config's penalty block (PenaltyConfig.model_dump), for the table's labels."""
    plots = plot_all(out, summaries, recipes, (penalty or {}).get("kind", "outlier"))
    (out / "retrofit.json").write_text(json.dumps({"reference": ref, "targets": targets, "recipes": recipes,
                                                   "pretrained_sweep": pretrained, "penalty": penalty,
                                                   "variants": summaries},
                                                  indent=1, default=str))
    flat = []
    for s in summaries:
        row = {"variant": s["variant"], "trainable": sum(s["trainable"].values()), "steps": s["steps"],
               "step0_max_abs_logit_diff": s["step0"].get("max_abs_logit_diff"), "step0_mean_kl": s["step0"].get("mean_kl"),
               "heldout_loss_step0": s["heldout_loss_step0"], "final_heldout_loss": s["final_heldout_loss"],
               "max_abs_before": s["before"].get("max_abs"), "max_abs_after": s["census"].get("max_abs"),
               "max_ratio_after": s["census"].get("max_ratio"), "first_token_attn_after": s["census"].get("first_token_attn"),
               "fp_ppl": s["sweep"].get("fp_ppl"), "penalty_trained": s["penalty"]["trained"],
               "penalty_first": s["penalty"]["first"], "penalty_last": s["penalty"]["last"]}
        row.update({f"dppl_pct_{r}": s["sweep"]["recipes"].get(r, {}).get("delta_ppl_pct") for r in recipes})
        flat.append(row)
    with open(out / "retrofit.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in flat for k in r)))
        w.writeheader()
        w.writerows(flat)
    write_markdown(out / "retrofit.md", summaries, recipes, targets, ref, pretrained, plots, penalty)
    return out / "retrofit.md"
