"""Report plots (matplotlib, Agg): size-vs-quality Pareto fronts (with the paired 95% intervals as
error bars) and per-layer error curves."""
from __future__ import annotations

import io
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from .tables import layer_frame, weight_format  # noqa: E402

_STYLES = [("#9aa5b1", "o"), ("#3066be", "s"), ("#2a9d8f", "^"), ("#e9a03b", "D"), ("#8e5ea2", "v"), ("#6c757d", "P")]


def pareto_front(df: pd.DataFrame, x: str, y: str, higher_is_better: bool) -> pd.DataFrame:
    """Rows not dominated by another (smaller or equal x and better or equal y, one strictly)."""
    d = df.assign(**{x: pd.to_numeric(df[x], errors="coerce"), y: pd.to_numeric(df[y], errors="coerce")})
    d = d.dropna(subset=[x, y])
    keep = []
    for i, r in d.iterrows():
        better = (d[y] >= r[y]) if higher_is_better else (d[y] <= r[y])
        strictly = (d[y] > r[y]) if higher_is_better else (d[y] < r[y])
        dominated = ((d[x] <= r[x]) & better & ((d[x] < r[x]) | strictly)).any()
        if not dominated:
            keep.append(i)
    return d.loc[keep].sort_values(x)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def with_error_bounds(df: pd.DataFrame) -> pd.DataFrame:
    """Absolute y bounds of the paired 95% intervals vs FP: ppl_lo/ppl_hi = FP ppl x (1 + delta_ppl_lo/hi
    / 100), task_lo/task_hi = FP task_acc_mean + task_delta_lo/hi (empty where a row has no interval)."""
    fp = df[df["mode"] == "fp"] if "mode" in df.columns else df.iloc[0:0]
    out = df.copy()

    def num(c: str) -> pd.Series:
        return pd.to_numeric(df[c], errors="coerce") if c in df.columns else pd.Series(math.nan, index=df.index)

    fp_ppl = float(num("ppl")[fp.index[0]]) if len(fp) else math.nan
    fp_task = float(num("task_acc_mean")[fp.index[0]]) if len(fp) else math.nan
    out["ppl_lo"], out["ppl_hi"] = fp_ppl * (1 + num("delta_ppl_lo") / 100), fp_ppl * (1 + num("delta_ppl_hi") / 100)
    out["task_lo"], out["task_hi"] = fp_task + num("task_delta_lo"), fp_task + num("task_delta_hi")
    return out


def pareto_plot(df: pd.DataFrame, y: str, label: str, higher_is_better: bool, log_y: bool = False,
                bounds: tuple[str, str] | None = None) -> bytes | None:
    """bounds: columns with each point's absolute lower/upper y bound, drawn as error bars."""
    ok = df[df["status"] == "ok"] if "status" in df.columns else df
    if y not in ok.columns or pd.to_numeric(ok[y], errors="coerce").notna().sum() == 0:
        return None
    d = ok.assign(_x=pd.to_numeric(ok["bits_per_weight"], errors="coerce"), _y=pd.to_numeric(ok[y], errors="coerce"))
    d = d.dropna(subset=["_x", "_y"])
    front = pareto_front(d.rename(columns={"_x": "x_", "_y": "y_"}), "x_", "y_", higher_is_better)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    fmt = d.apply(weight_format, axis=1).fillna("fp / other")  # INT, FP8, FP4 told apart at equal bits
    for (name, g), (color, marker) in zip(d.groupby(fmt, sort=True), _STYLES * len(d)):
        ax.scatter(g["_x"], g["_y"], color=color, marker=marker, zorder=2, label=name)
    if bounds and all(c in d.columns for c in bounds):
        e = d.assign(_lo=pd.to_numeric(d[bounds[0]], errors="coerce"), _hi=pd.to_numeric(d[bounds[1]], errors="coerce"))
        e = e.dropna(subset=["_lo", "_hi"])
        if len(e):
            yerr = [(e["_y"] - e["_lo"]).clip(lower=0), (e["_hi"] - e["_y"]).clip(lower=0)]
            ax.errorbar(e["_x"], e["_y"], yerr=yerr, fmt="none", ecolor="#52606d", elinewidth=1, capsize=3,
                        zorder=2, label="95% paired interval vs FP")
    ax.plot(front["x_"], front["y_"], "-o", color="#d1495b", zorder=3, label="Pareto frontier")
    for _, r in d.iterrows():
        ax.annotate(r["recipe"], (r["_x"], r["_y"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if log_y and (d["_y"] > 0).all():
        ax.set_yscale("log")
    ax.set_xlabel("bits per weight (all parameters)")
    ax.set_ylabel(label)
    ax.set_title(f"size vs {label}" + (" (higher is better)" if higher_is_better else " (lower is better)"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def layer_error_plot(df: pd.DataFrame) -> bytes | None:
    layers = layer_frame(df)
    layers = layers[layers["recipe"].isin(df.loc[df["mode"] != "fp", "recipe"])] if "mode" in df.columns else layers
    if not len(layers):
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.0))
    for name, g in layers.groupby("recipe", sort=False):
        vals = pd.to_numeric(g["rel_error"], errors="coerce")
        if vals.notna().any():
            ax1.plot(g["layer"], vals.clip(lower=1e-12), marker=".", label=name)
        sinks = pd.to_numeric(g["sink"], errors="coerce")
        if sinks.notna().any():
            ax2.plot(g["layer"], sinks, marker=".", label=name)
    fp = df[df["mode"] == "fp"] if "mode" in df.columns else df.iloc[0:0]
    if len(fp) and isinstance(fp.iloc[0].get("layer_sink"), list):
        s = [v if v is not None else math.nan for v in fp.iloc[0]["layer_sink"]]
        ax2.plot(range(len(s)), s, "k--", label="fp")
    ax1.set_yscale("log")
    ax1.set(xlabel="decoder layer", ylabel="relative output error vs FP", title="where error enters")
    ax2.set(xlabel="decoder layer", ylabel="attention mass on first token", title="attention sink")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _png(fig)
