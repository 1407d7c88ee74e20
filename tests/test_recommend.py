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


def _bounded(*rows) -> pd.DataFrame:
    cols = ["recipe", "status", "mode", "bits_per_weight", "ppl", "delta_ppl_pct", "kl", "delta_ppl_lo", "delta_ppl_hi"]
    df = pd.DataFrame([dict(zip(cols, r)) for r in rows])
    df["ci_units"], df["ci_block"] = 32, 128
    return df


def test_a_recipe_passes_only_when_the_tolerance_holds_at_the_upper_bound():
    df = _bounded(FP + (0.0, 0.0), ("w8", "ok", "simulated", 8.0, 20.1, 0.5, 0.01, 0.1, 0.9),
                  ("w4", "ok", "simulated", 4.5, 20.3, 1.5, 0.05, 0.5, 2.6))
    rec = recommend(df, Tolerance(2.0))
    assert rec.chosen == "w8"
    reason = rec.verdicts[0].reasons[0]
    assert rec.verdicts[0].recipe == "w4" and "within +2% but its 95% upper bound +2.60% is not" in reason
    se = (2.6 - 0.5) / (2 * 1.96)  # the interval's standard error
    need = math.ceil(32 * ((1.96 + 0.84) * se / (2.0 - 1.5)) ** 2)  # n (z se / gap)^2, 80% power
    assert f"~{need} blocks of 128 tokens would show it" in reason
    assert recommend(df, Tolerance(3.0)).chosen == "w4"


def test_task_retention_holds_at_the_lower_bound_of_the_paired_change():
    df = _bounded(FP + (0.0, 0.0), ("w8", "ok", "simulated", 8.0, 20.1, 0.5, 0.0, 0.1, 0.9),
                  ("w4", "ok", "simulated", 4.5, 20.2, 1.0, 0.1, 0.2, 1.5))
    df["acc:t1"], df["n:t1"] = [0.50, 0.50, 0.50], 30
    df["acc_delta_lo:t1"], df["acc_delta_hi:t1"] = [0.0, -0.05, -0.20], [0.0, 0.05, 0.15]
    rec = recommend(df, Tolerance(2.0, min_task_retention_pct=80.0))  # allowed loss 0.2 x 0.5 = 0.1
    assert rec.chosen == "w8"
    reason = rec.verdicts[0].reasons[0]
    assert reason.startswith("t1: accuracy 0.500 = 100.0% of FP 0.500, but the 95% lower bound of its change, -0.200")
    assert "not shown with 30 documents" in reason


@pytest.mark.parametrize("kw", [{"max_ppl_increase_pct": -1.0}, {"max_ppl_increase_pct": math.nan},
                                {"min_task_retention_pct": 101.0}, {"min_task_retention_pct": 0.0},
                                {"min_task_retention_pct": math.inf}])
def test_impossible_tolerances_are_one_line_errors(kw):
    from quantbench.core.errors import QuantbenchError

    with pytest.raises(QuantbenchError) as e:
        Tolerance(**kw)
    assert "\n" not in str(e.value)


def _unit_rows() -> list[dict]:
    """FP and three recipes on the same 32 blocks and 30 documents; 'a' and 'b' differ by noise only."""
    import numpy as np

    rng = np.random.default_rng(0)
    tok = [128] * 32
    fp_nll = (128 * rng.uniform(2.8, 3.4, 32)).tolist()
    fp_docs = [int(x) for x in rng.random(30) < 0.5]

    def row(name, bits, shift, noise, flips):
        nll = [f + 128 * (shift + noise * rng.standard_normal()) for f in fp_nll]
        ppl = math.exp(sum(nll) / sum(tok))
        docs = [1 - d if i < flips else d for i, d in enumerate(fp_docs)]
        return {"recipe": name, "status": "ok", "mode": "simulated", "bits_per_weight": bits, "ppl": ppl,
                "delta_ppl_pct": 100 * (ppl / math.exp(sum(fp_nll) / sum(tok)) - 1), "kl": shift,
                "unit_tokens": tok, "unit_nll": nll, "unit_kl": [128 * shift] * 32, "ci_block": 128,
                "acc:t1": sum(docs) / 30, "n:t1": 30, "doc_acc:t1": docs, "task_metric": "acc"}

    fp = {"recipe": "fp", "status": "ok", "mode": "fp", "bits_per_weight": 16.0, "ppl": math.exp(sum(fp_nll) / 4096),
          "delta_ppl_pct": 0.0, "kl": 0.0, "unit_tokens": tok, "unit_nll": fp_nll, "unit_kl": [0.0] * 32,
          "ci_block": 128, "acc:t1": sum(fp_docs) / 30, "n:t1": 30, "doc_acc:t1": fp_docs, "task_metric": "acc"}
    return [fp, row("a", 9.0, 0.010, 0.002, 0), row("b", 9.5, 0.010, 0.002, 1), row("c", 4.5, 0.2, 0.01, 8)]


def test_interval_columns_are_paired_with_fp_and_the_lists_stay_out_of_the_csv():
    from quantbench.report.tables import scalar_frame, to_frame

    df = to_frame(_unit_rows()).set_index("recipe")
    for name in "abc":
        assert df.loc[name, "delta_ppl_lo"] <= df.loc[name, "delta_ppl_pct"] <= df.loc[name, "delta_ppl_hi"]
        assert df.loc[name, "kl_lo"] <= df.loc[name, "kl"] <= df.loc[name, "kl_hi"]
        assert df.loc[name, "acc_delta_lo:t1"] <= 0 <= df.loc[name, "acc_delta_hi:t1"] or name == "c"
    assert df.loc["a", "delta_ppl_lo"] > 0  # +1% per token on every block: clearly worse than FP
    assert (df.loc["fp", ["delta_ppl_lo", "delta_ppl_hi", "kl_lo", "kl_hi"]] == 0).all()
    assert df.loc["a", "ci_units"] == 32
    flat = scalar_frame(df.reset_index())
    assert not [c for c in flat.columns if c.startswith(("unit_", "doc_"))]


def test_recommendation_names_recipes_it_cannot_tell_apart_and_what_30_documents_can_show():
    from quantbench.report.tables import to_frame

    rec = recommend(to_frame(_unit_rows()), Tolerance(2.0, min_task_retention_pct=80.0))
    assert rec.chosen == "a"
    notes = "\n".join(rec.notes)
    assert "paired 95% intervals over 32 blocks of 128 tokens and 30 documents per task" in notes
    assert "a vs fp: perplexity +1.0" in notes and "measurably worse than FP" in notes
    assert "b vs a: perplexity ratio" in notes and "cannot be told apart at 32 blocks of 128 tokens" in notes
    assert "t1: 30 documents resolve only acc changes larger than about" in notes
    assert "they suffice to show 80% retention (a loss <= 0.120)" in notes  # ±0.06 < 0.12
    strict = "\n".join(recommend(to_frame(_unit_rows()), Tolerance(2.0, min_task_retention_pct=99.0)).notes)
    assert "showing 99% retention (a loss <= 0.006) needs ~" in strict
    assert "uncertainty:" in rec.text()
