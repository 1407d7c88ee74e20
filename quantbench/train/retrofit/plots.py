"""Retrofit plots: loss curves and Δppl (quantbench.train.plots), max activation and first-token attention
per layer before/after, the first token's tracked dims and the outlier penalty over training."""
from __future__ import annotations

from pathlib import Path

from ..plots import _plt, _save, plot_dppl, plot_losses


def _by_layer(path: Path, summaries: list[dict], keys: tuple[str, ...], titles: tuple[str, ...], log_y: bool) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4), squeeze=False)
    first = summaries[0]["before"].get("layers") or []
    for ax, key, title in zip(axes[0], keys, titles):
        if first:
            ax.plot([r["layer"] for r in first], [r[key] or 0 for r in first], "k--", label="step 0 (pretrained)")
        for s in summaries:
            rows = s["census"].get("layers") or []
            ax.plot([r["layer"] for r in rows], [r[key] or 0 for r in rows], marker="o", ms=3, label=s["variant"])
        ax.set_xlabel("layer")
        ax.set_title(title)
        if log_y:
            ax.set_yscale("log")
        ax.legend(fontsize=7)
    _save(plt, fig, path)


def plot_first_token_dims(path: Path, summaries: list[dict]) -> None:
    plt = _plt()
    dims = sorted({d for s in summaries for p in s["probes"] for r in p["layers"] for d in r["first_token_dims"]}, key=int)
    fig, axes = plt.subplots(1, max(1, len(dims)), figsize=(5.5 * max(1, len(dims)), 4), squeeze=False)
    for ax, d in zip(axes[0], dims):
        for s in summaries:
            steps = [p["step"] for p in s["probes"]]
            vals = [max(abs(r["first_token_dims"].get(d, 0.0)) for r in p["layers"]) for p in s["probes"]]
            ax.plot(steps, vals, marker="o", ms=3, label=s["variant"])
        ax.set_xlabel("step")
        ax.set_title(f"first token |x[{d}]|, max over layers")
        ax.legend(fontsize=7)
    _save(plt, fig, path)


def plot_penalty(path: Path, summaries: list[dict], kind: str) -> None:
    """The outlier penalty of each step's training batch (dashed: variants that do not train on it)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for s in summaries:
        pen = s["curves"].get("penalty") or []
        trained = (s.get("penalty") or {}).get("trained")
        ax.plot([r[0] for r in pen], [r[1] for r in pen], "-" if trained else "--", label=s["variant"])
    ax.set_xlabel("step")
    ax.set_title(f"{kind} penalty of the training batch")
    ax.legend(fontsize=7)
    _save(plt, fig, path)


def plot_all(out: Path, summaries: list[dict], recipes: list[str], penalty_kind: str = "outlier") -> list[str]:
    names = ["loss_curves.png"]
    plot_losses(out / names[0], summaries)
    if all(s["census"] for s in summaries):
        names += ["max_activation_by_layer.png", "sink_mass_by_layer.png", "first_token_dims.png"]
        _by_layer(out / names[1], summaries, ("max_abs", "ratio"), ("max |residual|", "max / median |residual|"), True)
        _by_layer(out / names[2], summaries, ("first_token_attn",), ("first-token attention mass",), False)
        plot_first_token_dims(out / names[3], summaries)
    if recipes and any(s["sweep"].get("recipes") for s in summaries):
        names.append("delta_ppl.png")
        plot_dppl(out / names[-1], summaries, recipes)
    if any(s["curves"].get("penalty") for s in summaries):
        names.append("penalty_curves.png")
        plot_penalty(out / names[-1], summaries, penalty_kind)
    return names
