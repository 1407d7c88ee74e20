"""A self-contained report.html per run: tables and every plot embedded as base64 PNG."""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import pandas as pd

from .plots import layer_error_plot, pareto_plot, with_error_bounds
from .tables import COLUMNS, EXPORT_COLUMNS, KLD_REPORT, scalar_frame, task_columns, task_names

_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;font-size:13px;margin:1em 0}th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f1f3f5}td:first-child,th:first-child{text-align:left}img{max-width:100%;border:1px solid #eee;margin:.5em 0}
pre{background:#f8f9fa;padding:1em;white-space:pre-wrap}.wide{overflow-x:auto}h2{border-bottom:1px solid #ddd;padding-bottom:.2em}"""


def _img(png: bytes, alt: str) -> str:
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}"/>' \
           f"<figcaption>{html.escape(alt)}</figcaption></figure>"


def _table(df: pd.DataFrame, cls: str) -> str:
    table = df.to_html(index=False, classes=cls, float_format=lambda v: f"{v:.4g}", na_rep="", border=0)
    return f'<div class="wide">{table}</div>'


_INTERVALS = """<p>Intervals: <code>delta_ppl_lo/hi</code>, <code>kl_lo/hi</code>, <code>acc_delta_lo/hi:&lt;task&gt;</code>
and <code>task_delta_lo/hi</code> are 95% intervals paired with the FP model on the same units: a bootstrap over
blocks of scored tokens (<code>ci_units</code> of them) for perplexity and KL, a Jeffreys-Dirichlet interval over the
paired documents for task accuracy (see docs/evaluation.md). The plots draw them as error bars.</p>"""


_KLD = """<p>The statistics of llama.cpp's <code>llama-perplexity --kl-divergence</code> over every scored token
(KL in nats; <code>dp_rms</code> a fraction, llama.cpp prints percent; <code>same_top_p</code> is our
<code>top1</code>). Compare with llama.cpp's tables only at the same context, base precision and text
(docs/metrics.md).</p>"""


def _kld_section(flat: pd.DataFrame) -> list[str]:
    """The KLD report table (recipe + KLD_REPORT), or nothing when no row has the per-token statistics."""
    if "kld_p999" not in flat.columns or flat["kld_p999"].isna().all():
        return []
    cols = ["recipe"] + [c for c in KLD_REPORT if c in flat.columns]
    table = flat[cols].rename(columns={"kl": "kld_mean", "top1": "same_top_p"})
    return ["<h2>KL divergence statistics (llama.cpp's report)</h2>", _table(table, "kld"), _KLD]


def _plots(df: pd.DataFrame, task_metric: str) -> list[str]:
    out = []
    df = with_error_bounds(df)
    png = pareto_plot(df, "ppl", "perplexity", higher_is_better=False, log_y=True, bounds=("ppl_lo", "ppl_hi"))
    if png:
        out.append(_img(png, "Pareto: bits per weight vs perplexity (error bars: paired 95% interval vs FP)"))
    if "task_acc_mean" in df.columns:
        png = pareto_plot(df, "task_acc_mean", f"mean task accuracy ({task_metric})", higher_is_better=True,
                          bounds=("task_lo", "task_hi"))
        if png:
            out.append(_img(png, "Pareto: bits per weight vs task accuracy (error bars: paired 95% interval vs FP)"))
    png = layer_error_plot(df)
    if png:
        out.append(_img(png, "Per-layer output error and attention sink"))
    return out


def build_html(df: pd.DataFrame, run_dir: Path, recommendation: str | None = None, task_metric: str = "acc") -> str:
    """The report page for the table `df` of the run in `run_dir` (census PNGs there are embedded)."""
    flat = scalar_frame(df)
    main = [c for c in COLUMNS if c in flat.columns]
    parts = [f"<h1>quantbench report: {html.escape(run_dir.name)}</h1>", "<h2>Results</h2>",
             _table(flat[main], "results"), _INTERVALS, *_kld_section(flat)]
    if task_names(flat):
        parts += ["<h2>Downstream tasks (lm-eval)</h2>", _table(flat[["recipe"] + task_columns(flat)], "tasks")]
    export = ["recipe"] + [c for c in EXPORT_COLUMNS if c in flat.columns]
    if len(export) > 1:  # quantbench export: the checkpoint as written and reloaded, beside the simulated row
        rows = flat[flat[export[1]].notna()]
        parts += ["<h2>Exported checkpoints (reloaded and verified)</h2>", _table(rows[["recipe", "ppl", *export[1:]]], "export")]
    if recommendation:
        parts += ["<h2>Recommendation</h2>", f"<pre>{html.escape(recommendation)}</pre>"]
    parts += ["<h2>Plots</h2>", *_plots(df, task_metric)]
    census_pngs = sorted(run_dir.glob("*.png"))
    if census_pngs:
        parts.append("<h2>Outlier census</h2>")
        parts += [_img(p.read_bytes(), p.stem.replace("_", " ")) for p in census_pngs]
    manifest = run_dir / "manifest.json"
    if manifest.exists():
        m = json.loads(manifest.read_text())
        keep = {k: m.get(k) for k in ("created", "quantbench_git", "packages", "device", "dtype", "model",
                                      "corpus", "eval_protocol")}
        parts += ["<h2>Manifest</h2>", f"<pre>{html.escape(json.dumps(keep, indent=2, default=str))}</pre>"]
    body = "\n".join(parts)
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>quantbench {html.escape(run_dir.name)}</title>"
            f"<style>{_CSS}</style></head><body>{body}</body></html>")


def write_html(df: pd.DataFrame, run_dir: Path, recommendation: str | None = None, task_metric: str = "acc") -> Path:
    from ..core.fileio import atomic_write_text

    path = run_dir / "report.html"
    atomic_write_text(path, build_html(df, run_dir, recommendation, task_metric))
    return path
