"""Census plots (PNG, matplotlib Agg): activation magnitudes per layer, sink-mass heatmap,
weight ratio per module and layer, token-class shares."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _activations(c: dict, path: Path) -> None:
    rows = c["layers"]
    x = [r["layer"] for r in rows]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.semilogy(x, [r["max_abs"] for r in rows], "o-", label="residual max |x|")
    ax.semilogy(x, [max(r["median_abs"], 1e-8) for r in rows], "s--", label="residual median |x|")
    down = c["model"]["down_proj"]
    dmax = [L[down]["max_abs"] if down in L else None for L in c["linear_inputs"]]
    if any(v is not None for v in dmax):
        ax.semilogy(x, [v or float("nan") for v in dmax], "^:", label=f"{down} input max |x|")
    ax.axhline(c["thresholds"]["abs"], color="grey", lw=0.8, ls=":", label="abs threshold")
    for r in rows:
        if r["outlier_dims"]:
            ax.annotate(",".join(str(d["dim"]) for d in r["outlier_dims"][:3]), (r["layer"], r["max_abs"]),
                        textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
    ax.set(xlabel="layer", ylabel="|x| (log)", title="Activation magnitude per layer (labels: outlier dims)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _sinks(c: dict, path: Path) -> None:
    grid = [r["first_token_mass_by_head"] or [] for r in c["layers"]]
    width = max((len(g) for g in grid), default=0)
    data = [g + [float("nan")] * (width - len(g)) for g in grid]  # [L, H]
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * width + 2), max(3, 0.22 * len(data) + 1.5)))
    im = ax.imshow(data if width else [[float("nan")]], aspect="auto", cmap="viridis", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, label="attention mass on the first token")
    ax.set(xlabel="head", ylabel="layer", title="First-token (sink) attention mass")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _weights(c: dict, path: Path) -> None:
    layers = c["weights"]["layers"]
    modules = sorted({m for L in layers for m in L})
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for m in modules:
        ax.plot(range(len(layers)), [L[m]["max_over_mean"] if m in L else float("nan") for L in layers],
                marker=".", label=m)
    ax.set(xlabel="layer", ylabel="max|W| / mean|W|", title="Weight outlier ratio per module and layer")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _classes(c: dict, path: Path) -> None:
    shares = c["token_classes"]["shares"]
    counts = c["token_classes"]["counts"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    bars = ax.bar(list(shares), [100 * v for v in shares.values()], color="tab:orange")
    for b, k in zip(bars, shares):
        ax.annotate(str(counts[k]), (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", fontsize=8)
    ax.set(ylabel="% of outlier tokens", ylim=(0, 105), title="Outlier token classes (n on bars)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


PLOTS = ("census_activations.png", "census_sinks.png", "census_weights.png", "census_token_classes.png")



def write_plots(c: dict, out: Path) -> list[Path]:
    from ..core.fileio import atomic_path

    paths = [out / name for name in PLOTS]
    for fn, p in zip((_activations, _sinks, _weights, _classes), paths):
        with atomic_path(p) as tmp:  # a full disk never leaves half a PNG
            fn(c, tmp)
    return paths
