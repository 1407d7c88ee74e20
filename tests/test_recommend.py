"""Recommendation logic on hand-made result tables."""
from __future__ import annotations

import math

import pandas as pd
import pytest

from quantbench.report.recommend import Tolerance, recommend

CENSUS = {"summary": {"max_abs": 2000.0, "max_ratio": 4000.0, "outlier_dims": [7], "outlier_layers": [1, 2],
                      "mean_first_token_attn": 0.4,
                      "max_weight_ratio": {"max_over_mean": 90.0, "layer": 1, "module": "mlp.down_proj"}}}
RECIPES = {"w8a8-tensor": {"name": "w8a8-tensor", "weights": {"bits": 8, "granularity": "channel"},
                           "activations": {"bits": 8, "granularity": "tensor", "dynamic": False}},
           "w4": {"name": "w4", "weights": {"bits": 4, "granularity": "group", "group_size": 64}}}


def table(*rows) -> pd.DataFrame:
    cols = ["recipe", "status", "mode", "bits_per_weight", "ppl", "delta_ppl_pct", "kl"]
    return pd.DataFrame([dict(zip(cols, r)) for r in rows])


FP = ("fp", "ok", "fp", 16.0, 20.0, 0.0, 0.0)


def test_smallest_passing_recipe_wins_and_smaller_failures_are_explained():
    df = table(FP, ("w8", "ok", "simulated", 8.0, 20.2, 1.0, 0.01), ("w4", "ok", "simulated", 4.5, 24.0, 20.0, 0.2))
    rec = recommend(df, Tolerance(2.0), CENSUS, RECIPES)
    assert rec.chosen == "w8"
    failed = {v.recipe: v for v in rec.verdicts if not v.passed}
    assert list(failed) == ["w4"]
    assert "perplexity +20.00% > +2% allowed" in failed["w4"].reasons[0] and "over by 18.00" in failed["w4"].reasons[0]
    assert any("mlp.down_proj" in c and "90" in c for c in failed["w4"].causes)  # weight outliers from the census
    text = rec.text()
    assert "-> w8" in text and "x w4" in text and "recipes:" in text


def test_ties_in_size_go_to_the_better_quality_then_name():
    df = table(FP, ("b", "ok", "simulated", 8.0, 20.3, 1.5, 0.02), ("a", "ok", "simulated", 8.0, 20.1, 0.5, 0.03),
               ("c", "ok", "simulated", 8.0, 20.1, 0.5, 0.01))
    assert recommend(df, Tolerance(2.0)).chosen == "c"  # same delta as a, lower KL
    df2 = table(FP, ("b", "ok", "simulated", 8.0, 20.1, 0.5, 0.01), ("a", "ok", "simulated", 8.0, 20.1, 0.5, 0.01))
    assert recommend(df2, Tolerance(2.0)).chosen == "a"


def test_nothing_meets_the_tolerance_falls_back_to_fp_or_to_nothing():
    df = table(FP, ("w8a8-tensor", "ok", "simulated", 8.0, 50.0, 150.0, 1.0))
    rec = recommend(df, Tolerance(2.0), CENSUS, RECIPES)
    assert rec.chosen == "fp" and not rec.verdicts[0].passed
    why = " ".join(rec.verdicts[0].causes)
    assert "per-tensor range" in why and "2000" in why and "[7]" in why  # tied to the activation outliers
    rec2 = recommend(df[df["recipe"] != "fp"], Tolerance(2.0))
    assert rec2.chosen is None and "no recipe meets the tolerance" in rec2.text()


def test_missing_metrics_fail_instead_of_passing():
    df = table(FP, ("w4", "ok", "simulated", 4.5, None, math.nan, None), ("w8", "ok", "simulated", 8.0, 20.1, 0.5, 0.0))
    rec = recommend(df, Tolerance(2.0))
    assert rec.chosen == "w8" and rec.verdicts[0].reasons == ["perplexity not measured"]
    rec_t = recommend(df, Tolerance(2.0, min_task_retention_pct=99.0))
    assert rec_t.chosen == "fp"
    assert any("task accuracy not measured" in r for v in rec_t.verdicts for r in v.reasons)
    skipped = pd.concat([df, table(("w2", "skipped: no backend", "bnb", 2.0, None, None, None))])
    assert "not evaluated: w2" in recommend(skipped, Tolerance(2.0)).text()


@pytest.mark.parametrize("retention, expected", [(99.0, "w8"), (90.0, "w4")])
def test_task_retention_threshold(retention, expected):
    df = table(FP, ("w8", "ok", "simulated", 8.0, 20.1, 0.5, 0.0), ("w4", "ok", "simulated", 4.5, 20.2, 1.0, 0.1))
    df["acc:t1"] = [0.50, 0.50, 0.47]
    df["acc_se:t1"] = [0.05, 0.05, 0.05]
    rec = recommend(df, Tolerance(2.0, min_task_retention_pct=retention))
    assert rec.chosen == expected
    if expected == "w8":
        reason = rec.verdicts[0].reasons[0]
        assert reason.startswith("t1: accuracy 0.470 = 94.0% of FP 0.500 < 99%") and "short by 5.0" in reason
