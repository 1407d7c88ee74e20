"""The recommendation compares weight formats at equal bits (issue 23): per W/A class, the best row of each
format (int4, nvfp4, mxfp4, fp8, ...) read from the recipe's content, not its name."""
import json

import pandas as pd

from quantbench.report.plots import pareto_plot
from quantbench.report.recommend import Tolerance, recommend


def _row(recipe, fmt, bits, w_bits, a_bits, dppl, bpw):
    w = {"format": fmt, "bits": bits, "granularity": "group", "group_size": 16}
    return {"recipe": recipe, "status": "ok", "mode": "simulated", "bits_per_weight": bpw, "ppl": 10 * (1 + dppl / 100),
            "delta_ppl_pct": dppl, "delta_ppl_lo": dppl - 1, "delta_ppl_hi": dppl + 1, "kl": 0.1, "w_bits": w_bits,
            "a_bits": a_bits, "recipe_key": json.dumps({"name": recipe, "weights": w})}


def table():
    fp = {"recipe": "fp", "status": "ok", "mode": "fp", "bits_per_weight": 16, "ppl": 10.0, "delta_ppl_pct": 0.0,
          "delta_ppl_lo": 0.0, "delta_ppl_hi": 0.0, "kl": 0.0, "w_bits": None, "a_bits": None, "recipe_key": "{}"}
    return pd.DataFrame([fp,
                         _row("w4-rtn", "int", 4, 4, None, 30.0, 4.3),
                         _row("w4-gptq", "int", 4, 4, None, 12.0, 4.3),  # the best int4 W4A16
                         _row("nv-rtn", "nvfp4", 4, 4, None, 20.0, 4.5),  # the only nvfp4 W4A16
                         _row("mx-a4", "mxfp4", 4, 4, 4, 90.0, 4.25),  # W4A4: alone in its class, no line
                         _row("w8", "int", 8, 8, 8, 3.0, 8.3),
                         _row("f8", "fp8", 8, 8, 8, 1.5, 8.3),
                         _row("f8-bad", "fp8", 8, 8, 8, 9.0, 8.3),
                         {**_row("broken", "nvfp4", 4, 4, None, 1.0, 4.5), "status": "error"}])  # not ok: ignored


def test_best_of_each_weight_format_per_class():
    rec = recommend(table(), Tolerance(5.0))
    assert rec.equal_bits == [
        "W4A16: int4 w4-gptq +12.0% [+11.0, +13.0] (4.30 b/w); nvfp4 nv-rtn +20.0% [+19.0, +21.0] (4.50 b/w)",
        "W8A8: fp8 f8 +1.5% [+0.5, +2.5] (8.30 b/w); int8 w8 +3.0% [+2.0, +4.0] (8.30 b/w)"]
    text = rec.text()
    assert "at equal bits, the best of each weight format" in text and "  W8A8: fp8 f8 +1.5%" in text
    assert rec.chosen == "f8"  # the smallest within +5% (ties on size go to the lower increase)


def test_tables_without_recipe_content_give_no_comparison():
    assert recommend(table().drop(columns=["recipe_key"]), Tolerance(5.0)).equal_bits == []


def test_pareto_plot_draws_each_format():
    png = pareto_plot(table(), "ppl", "perplexity", higher_is_better=False)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
