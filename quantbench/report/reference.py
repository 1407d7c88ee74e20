"""Measured tables in README/docs are produced, not typed.

`make results` reruns the reference runs into results/reference/<name>/ (committed with their
manifests); `quantbench tables` then rewrites every block

    <!-- reference: <name> columns=recipe,bits,ppl,dppl,kl,top1 -->
    ...generated table...
    <!-- /reference -->

in README.md and docs/*.md from results/reference/<name>/results.csv (and config.yaml, for the
"gap closed" column). `quantbench tables --check` (and a test) fails when a block differs from
what the committed files give.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import pandas as pd
import yaml

from ..core.errors import QuantbenchError
from .tables import num as _num

BLOCK = re.compile(r"(<!-- reference: (?P<name>[\w.-]+)(?: columns=(?P<cols>[\w,]+))? -->\n)(?P<body>.*?)(<!-- /reference -->)",
                   re.S)
DEFAULT_COLUMNS = "recipe,bits,ppl,dppl,kl,top1"



def _interval(row: pd.Series, col: str, fmt: str, sign: bool = False, bounds: str | None = None) -> str:
    """`col` with its interval from the columns `<bounds>_lo`, `<bounds>_hi` (default: `<col>_lo/_hi`)."""
    v = _num(row.get(col))
    if v is None:
        return "—"
    txt = f"{v:+{fmt}}" if sign else f"{v:{fmt}}"
    lo, hi = _num(row.get(f"{bounds or col}_lo")), _num(row.get(f"{bounds or col}_hi"))
    return txt + (f" [{lo:{fmt}}, {hi:{fmt}}]" if lo is not None and hi is not None else "")


def _naive_of(run_dir: Path) -> dict[str, str]:
    """recipe -> the recipe of the same run with the same quantizers and no mitigations."""
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    recipes = [r for r in cfg.get("recipes", []) if isinstance(r, dict)]

    def key(r: dict) -> str:
        return repr({k: r.get(k) for k in ("weights", "activations", "kv", "backend", "overrides", "exclude")})

    plain = {key(r): r["name"] for r in recipes if not r.get("mitigations")}
    return {r["name"]: plain[key(r)] for r in recipes if r.get("mitigations") and key(r) in plain}


def _gap(df: pd.DataFrame, naive: dict[str, str]) -> Callable[[pd.Series], str]:
    ppl = dict(zip(df["recipe"], pd.to_numeric(df["ppl"], errors="coerce")))
    fp = next((ppl[r] for r, m in zip(df["recipe"], df.get("mode", df["recipe"])) if m == "fp"), None)

    def cell(row: pd.Series) -> str:
        base = naive.get(row["recipe"])
        if base is None or fp is None or base not in ppl or not _num(row.get("ppl")):
            return ""
        gap = ppl[base] - fp
        return f"{100 * (ppl[base] - float(row['ppl'])) / gap:.0f} %" if gap > 0 else ""
    return cell


def _text(v) -> str:
    return "—" if v is None or (isinstance(v, float) and v != v) else str(v)


def _fmt(v, spec: str) -> str:
    x = _num(v)
    return "—" if x is None else f"{x:{spec}}"


def _percent(v) -> float | None:
    x = _num(v)
    return None if x is None else 100 * x


COLUMNS: dict[str, tuple[str, Callable]] = {
    "recipe": ("recipe", lambda r: str(r["recipe"])),
    "mitigations": ("mitigations", lambda r: str(r.get("mitigations") or "none")),
    "status": ("status", lambda r: str(r.get("status"))),
    "bits": ("bits/weight", lambda r: _fmt(r.get("bits_per_weight") or None, ".2f")),  # 0: not measured
    "ppl": ("ppl", lambda r: _fmt(r.get("ppl") or None, ".2f")),
    "dppl": ("Δppl % [95% CI]", lambda r: _interval(r, "delta_ppl_pct", ".1f", sign=True, bounds="delta_ppl")),
    "kl": ("KL [95% CI]", lambda r: _interval(r, "kl", ".3f")),
    "top1": ("top-1", lambda r: _fmt(r.get("top1"), ".3f")),
    # llama.cpp's `perplexity --kl-divergence` report (quantbench/eval/kld.py); "same top p" is top-1
    "kld_median": ("median KLD", lambda r: _fmt(r.get("kld_median"), ".4f")),
    "kld_p99": ("99% KLD", lambda r: _fmt(r.get("kld_p99"), ".4f")),
    "kld_p999": ("99.9% KLD", lambda r: _fmt(r.get("kld_p999"), ".4f")),
    "kld_max": ("max KLD", lambda r: _fmt(r.get("kld_max"), ".3f")),
    "dp_rms": ("RMS Δp %", lambda r: _fmt(_percent(r.get("dp_rms")), ".3f")),
    "acc": ("task acc", lambda r: _fmt(r.get("task_acc_mean"), ".2f")),
    # llama.cpp files (backend llamacpp): the types llama.cpp gave the tensors, and the file's bits/weight
    "gguf_types": ("tensor types in the file", lambda r: _text(r.get("gguf_tensor_types")) or "—"),
    # llama.cpp's own forward of a llamacpp row's file on the row's windows (quantbench/export/llama_cpp_check.py)
    "lcpp_ppl": ("llama.cpp ppl", lambda r: _fmt(r.get("llama_cpp_ppl"), ".2f")),
    "lcpp_logit": ("llama.cpp max \\|Δlogit\\|", lambda r: _fmt(r.get("llama_cpp_logit_maxdiff"), ".2f")),
    "short_status": ("status", lambda r: str(r.get("status")).split(":")[0]),
    "tok_s": ("eval tok/s", lambda r: _fmt(r.get("eval_tok_s") or None, ".0f")),
    # exports (quantbench/export): what was written and what its reload gave
    "format": ("format", lambda r: _text(r.get("export_format"))),
    "verified": ("export_verified", lambda r: _text(r.get("export_verified")).lower()),
    "weights_equal": ("weights equal", lambda r: _text(r.get("export_weights_equal"))),
    "sim_ppl": ("ppl simulated", lambda r: _fmt(r.get("export_sim_ppl"), ".3f")),
    "reload_ppl": ("ppl reloaded", lambda r: _fmt(r.get("export_ppl"), ".3f") + (
        f" ({_num(r.get('export_ppl_delta_pct')):+.3f}%)" if _num(r.get("export_ppl_delta_pct")) is not None else "")),
    "logit": ("max \\|Δlogit\\|", lambda r: _fmt(r.get("export_logit_maxdiff"), ".2g")),
    "file_mb": ("file MB", lambda r: _fmt(r.get("export_file_mb"), ".1f")),
    "reload_tok_s": ("reloaded tok/s", lambda r: _fmt(r.get("export_tok_s"), ".0f")),
    "torchao_ppl": ("torchao int8 ppl (unverified)", lambda r: _fmt(r.get("export_torchao_ppl"), ".2f")),
    "llama_cpp_ppl": ("llama.cpp ppl (unverified)", lambda r: _fmt(r.get("export_llama_cpp_ppl"), ".2f")),
}


EXPORT_KEYS = {"format", "verified", "weights_equal", "sim_ppl", "reload_ppl", "logit", "file_mb", "reload_tok_s",
               "torchao_ppl", "llama_cpp_ppl"}


def render(run_dir: Path, columns: str = DEFAULT_COLUMNS) -> str:
    """The markdown table of a reference run (columns: keys of COLUMNS, plus 'gap')."""
    csv = run_dir / "results.csv"
    if not csv.exists():
        raise QuantbenchError(f"reference run {run_dir} has no results.csv (run `make results`)")
    df = pd.read_csv(csv)
    cols = columns.split(",")
    fns = {}
    for c in cols:
        if c == "gap":
            fns[c] = ("gap closed", _gap(df, _naive_of(run_dir)))
        elif c in COLUMNS:
            fns[c] = COLUMNS[c]
        else:
            raise QuantbenchError(f"reference table: unknown column '{c}' (known: gap, {', '.join(COLUMNS)})")
    if set(cols) & EXPORT_KEYS and "export_format" in df.columns:
        df = df[df["export_format"].notna()]  # an export table lists the exported recipes
    head = [fns[c][0] for c in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(cols)]
    for _, row in df.iterrows():
        lines.append("| " + " | ".join(fns[c][1](row).replace("|", "\\|") for c in cols) + " |")
    return "\n".join(lines) + "\n"


def sync(files: list[Path], reference_root: Path, check: bool = False) -> list[str]:
    """Rewrite (or with check, compare) every reference block in `files`; returns the files that
    differ (changed, or would change)."""
    differ = []
    for f in files:
        text = f.read_text()

        def fill(m: re.Match) -> str:
            body = render(reference_root / m["name"], m["cols"] or DEFAULT_COLUMNS)
            return m.group(1) + body + m.group(5)

        new = BLOCK.sub(fill, text)
        if new != text:
            differ.append(str(f))
            if not check:
                f.write_text(new)
    return differ


def doc_files(root: Path) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]
