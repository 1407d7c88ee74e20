"""`recommend --target`: the recommendation among the rows whose recipe runs on a device, on tiny run directories
(config.yaml + rows.jsonl, no model), and the `hardware` of recipes read from their content."""
from __future__ import annotations

import json

import pytest
from reliability_common import assert_error, cli

from quantbench.quant.spec import QuantSpec, Recipe
from quantbench.report.hardware import TARGETS, recipe_needs

# The rule, stated independently of quantbench/report/hardware.py (vLLM's kernels; llama.cpp for GGUF types):
# NVFP4 W4A4 has native GEMMs on SM100 and SM120 only; MXFP4 W4A4 on SM100 only; int4 x FP8 (W4A8) on SM90 only;
# FP8 W8A8 from SM89; INT8 W8A8 from SM75 and on x86 CPUs; int4 weight-only (Marlin) and NVFP4 weight-only (FP4
# Marlin) from SM80; llama.cpp types on CPUs, Apple and NVIDIA GPUs; int W4A4 has no kernel anywhere.
SM100 = {"b200", "gb200", "b300"}
SM120 = {"rtx5090", "rtx-pro-6000"}
SM90 = {"h100", "h200", "gh200"}
SM89 = {"l4", "l40s", "rtx4090"}
SM80 = {"a100", "a10", "rtx3090"}
GPUS = SM80 | SM89 | SM90 | SM100 | SM120 | {"t4"}
RUNS_ON = {
    "nvfp4": SM100 | SM120,
    "mxfp4": SM100,
    "w4afp8": SM90,
    "fp8": SM89 | SM90 | SM100 | SM120,
    "w8a8-token": GPUS | {"cpu"},
    "w4a16-g64": GPUS - {"t4"},
    "nvfp4a16": GPUS - {"t4"},
    "gguf-q4_k_m": GPUS | {"cpu", "apple", "mps"},
    "w4a4-token": set(),
}


def custom_nvfp4(name: str = "my-fp4") -> Recipe:
    """A user's own NVFP4 W4A4 recipe: not a preset, so only its content says where it runs."""
    fp4 = dict(format="nvfp4")
    return Recipe(name=name, weights=QuantSpec(**fp4), activations=QuantSpec(**fp4, dynamic=True))


@pytest.mark.parametrize("recipe", sorted(RUNS_ON))
def test_each_preset_runs_exactly_where_the_rule_says(recipe):
    n = recipe_needs(recipe)
    assert {t for t in TARGETS if n.runs_on(TARGETS[t])} == RUNS_ON[recipe]


def test_a_custom_nvfp4_recipe_needs_what_nvfp4_needs_and_the_table_shows_it():
    from quantbench.report.tables import to_frame

    mine = custom_nvfp4()
    n = recipe_needs("my-fp4", {"my-fp4": mine})
    assert {t for t in TARGETS if n.runs_on(TARGETS[t])} == RUNS_ON["nvfp4"]
    assert recipe_needs("my-fp4") is None  # by name alone: unknown
    df = to_frame([{"recipe": "my-fp4", "status": "ok"}, {"recipe": "nvfp4", "status": "ok"}], {"my-fp4": mine})
    assert df["hardware"][0] == df["hardware"][1] and "SM100" in df["hardware"][0] and "SM120" in df["hardware"][0]
    # the same content under a preset's name is judged by its content, not by the name
    w8 = Recipe(name="nvfp4", weights=QuantSpec(bits=8), activations=QuantSpec(bits=8, granularity="token"))
    assert recipe_needs("nvfp4", {"nvfp4": w8}).runs_on(TARGETS["cpu"])


def test_a_mixed_recipe_runs_where_every_one_of_its_formats_runs():
    from quantbench.quant.spec import Override

    fp8 = dict(format="fp8", bits=8)
    base = custom_nvfp4("mixed")
    with_fp8 = base.model_copy(update={"overrides": (Override(match="layers\\.0\\.", weights=QuantSpec(**fp8),
                                                              activations=QuantSpec(**fp8, granularity="token")),)})
    n = recipe_needs("mixed", {"mixed": with_fp8})  # NVFP4 runs only where FP8 runs too: SM100 and SM120
    assert {t for t in TARGETS if n.runs_on(TARGETS[t])} == RUNS_ON["nvfp4"] & RUNS_ON["fp8"]
    int4a4 = base.model_copy(update={"overrides": (Override(match="layers\\.0\\.", weights=QuantSpec(bits=4),
                                                            activations=QuantSpec(bits=4, granularity="token")),)})
    n = recipe_needs("mixed", {"mixed": int4a4})  # one layer in int W4A4: no runtime holds the model
    assert not any(n.runs_on(t) for t in TARGETS.values())


# (recipe, bits/weight, perplexity increase %): the tolerance is +2%, the smallest passing row that runs wins
ROWS = [("fp", 16.0, 0.0), ("w4a4-token", 4.25, 1.5), ("my-fp4", 4.4, 1.8), ("nvfp4", 4.5, 1.0),
        ("w4afp8", 4.5, 1.9), ("w4a16-g64", 4.6, 5.0), ("gguf-q4_k_m", 4.9, 3.0), ("w8a8-token", 8.0, 0.8),
        ("fp8", 8.0, 0.3)]


def expected(target: str | None) -> str:
    runs = {**RUNS_ON, "my-fp4": RUNS_ON["nvfp4"], "fp": set(TARGETS)}
    ok = [(b, d, r) for r, b, d in ROWS if d <= 2.0 and (target is None or target in runs[r])]
    return min(ok)[2]


def run_dir(tmp_path, rows=ROWS):
    """A finished run's directory without a model: its resolved config.yaml and rows.jsonl."""
    from quantbench.run.config import dump_config, parse_config

    presets = [r for r, _, _ in rows if r != "my-fp4"]
    cfg = parse_config({"recipes": presets})
    if any(r == "my-fp4" for r, _, _ in rows):
        cfg = cfg.model_copy(update={"recipes": (*cfg.recipes, custom_nvfp4())})
    (tmp_path / "config.yaml").write_text(dump_config(cfg))
    lines = [json.dumps({"recipe": r, "status": "ok", "mode": "fp" if r == "fp" else "simulated",
                         "bits_per_weight": b, "ppl": 20 * (1 + d / 100), "delta_ppl_pct": d, "kl": d / 100})
             for r, b, d in rows]
    (tmp_path / "rows.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path


@pytest.mark.parametrize("target", [None, "b200", "h100", "l4", "a100", "cpu", "rtx5090", "apple"])
def test_the_target_picks_the_best_row_that_runs_there(tmp_path, capsys, target):
    d = run_dir(tmp_path)
    res = cli(capsys, "recommend", d, "--max-ppl-increase", "2%", *(["--target", target] if target else []))
    assert res.rc == 0, res.err[-2000:]
    assert f"-> {expected(target)} (" in res.out
    if target:
        aside = [r for r, _, _ in ROWS if r != "fp" and target not in {**RUNS_ON, "my-fp4": RUNS_ON["nvfp4"]}[r]]
        assert f"target: {target} (" in res.out and f"{len(aside)} row(s) set aside as not runnable there" in res.out
        assert f"that runs on {target}" in res.out or expected(target) == "fp"


def test_h100_sets_the_fp4_rows_aside_and_b200_may_choose_nvfp4(tmp_path, capsys):
    rows = [r for r in ROWS if r[0] not in ("w4a4-token", "my-fp4", "w4afp8")]  # nvfp4 is now the best overall
    d = run_dir(tmp_path, rows)
    assert "-> nvfp4 (" in cli(capsys, "recommend", d, "--target", "b200").out
    out = cli(capsys, "recommend", d, "--target", "h100").out
    assert "-> fp8 (" in out and "(nvfp4)" in out  # the one row set aside, named


def test_unknown_target_and_no_runnable_row_are_one_line_errors(tmp_path, capsys):
    d = run_dir(tmp_path, [r for r in ROWS if r[0] in ("fp", "nvfp4", "w4a4-token")])
    assert_error(cli(capsys, "recommend", d, "--target", "h1000"), "unknown target 'h1000'", "did you mean 'h100'")
    assert_error(cli(capsys, "recommend", tmp_path / "nope", "--target", "b20"), "did you mean 'b200'")
    line = assert_error(cli(capsys, "recommend", d, "--target", "a100"), "no quantized recipe", "a100")
    assert "nvfp4 (b200, gb200, b300, rtx5090, rtx-pro-6000)" in line and "w4a4-token" not in line
    assert_error(cli(capsys, "recommend", d, "--mixed", "--budget", "5", "--target", "h100"), "--target")
