"""PNG plots of the comparison (matplotlib, Agg backend): loss curves, max activation by layer,
Δperplexity per recipe."""
from __future__ import annotations

from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_losses(path: Path, summaries: list[dict]) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for s in summaries:
        tr = s["curves"]["train"]
        k = max(1, len(tr) // 50)  # moving average over ~2% of the run
        sm = [sum(r[2] for r in tr[max(0, i - k + 1): i + 1]) / len(tr[max(0, i - k + 1): i + 1]) for i in range(len(tr))]
        axes[0].plot([r[0] for r in tr], sm, label=s["variant"])
        h = s["curves"]["heldout"]
        axes[1].plot([r[0] for r in h], [r[2] for r in h], marker="o", ms=3, label=s["variant"])
    for ax, t in zip(axes, ("train loss (moving average)", "held-out loss")):
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.set_title(t)
        ax.legend(fontsize=8)
    _save(plt, fig, path)


def plot_max_by_layer(path: Path, summaries: list[dict]) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for s in summaries:
        layers = s["census"].get("layers") or []
        if not layers:
            continue
        axes[0].plot([r["layer"] for r in layers], [r["max_abs"] for r in layers], marker="o", label=s["variant"])
        axes[1].plot([r["layer"] for r in layers], [r["ratio"] for r in layers], marker="o", label=s["variant"])
    from matplotlib.ticker import MaxNLocator

    for ax, t in zip(axes, ("max |residual activation|", "max / median |activation|")):
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_yscale("log")
        ax.set_title(t)
        ax.legend(fontsize=8)
    _save(plt, fig, path)


def plot_dppl(path: Path, summaries: list[dict], recipes: list[str]) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(recipes) * len(summaries) / 3), 4))
    width = 0.8 / max(1, len(summaries))
    for i, s in enumerate(summaries):
        vals = [s["sweep"].get("recipes", {}).get(r, {}).get("delta_ppl_pct") or 0.0 for r in recipes]
        ax.bar([j + i * width for j in range(len(recipes))], vals, width, label=s["variant"])
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(recipes))], recipes)
    ax.set_ylabel("Δ perplexity vs own FP (%)")
    ax.axhline(0, color="black", lw=0.5)
    ax.legend(fontsize=8)
    _save(plt, fig, path)


def plot_all(out: Path, summaries: list[dict], recipes: list[str]) -> list[str]:
    names = ["loss_curves.png"]
    plot_losses(out / names[0], summaries)
    if any(s["census"] for s in summaries):
        names.append("max_activation_by_layer.png")
        plot_max_by_layer(out / names[-1], summaries)
    if recipes and any(s["sweep"].get("recipes") for s in summaries):
        names.append("delta_ppl.png")
        plot_dppl(out / names[-1], summaries, recipes)
    return names
