"""Census on the real default model (SmolLM2-135M, passed through GGUF Q4_1): its systematic
outliers are found, located and classified."""
from __future__ import annotations

import json

import pytest

from quantbench.census import run_census, write_census
from quantbench.data.corpus import calibration_batches
from quantbench.run.config import CensusConfig


@pytest.mark.integration
def test_default_model_census(default_lm, wiki, tmp_path):
    tok = default_lm.tokenizer
    batches = calibration_batches(tok, wiki.eval_text, 2, 128, seed=0)  # [2, 128], BOS first
    c = run_census(default_lm.model, batches, tok, CensusConfig(), batch_size=2)
    s = c["summary"]
    assert 507 in s["outlier_dims"] and s["max_abs"] > 1e4 and s["max_ratio"] > 5e3
    assert set(range(12, 27)) <= set(s["outlier_layers"])
    life = {r["dim"]: r for r in c["lifecycle"]}[507]
    assert life["writer"]["module"] == "mlp" and 8 <= life["emerges"] <= 14 and life["disappears"] is not None
    assert life["canceller"]["cancels"]
    first = [t for t in c["token_classes"]["tokens"] if t["pos"] == 0]
    assert len(first) == 2 and all(t["class"] == "initial" and 507 in t["dims"] for t in first)
    assert c["token_classes"]["shares"]["initial"] >= 0.5
    assert s["mean_first_token_attn"] > 0.2 and c["linkage"]["outlier_positions_that_are_sinks"] >= 0.5
    assert c["linear_inputs"][life["emerges"]]["mlp.down_proj"]["ratio"] > 1e3
    assert c["prequantized"]["detected"] and c["prequantized"]["grid_bits"] == 4
    paths = write_census(c, tmp_path)
    assert json.loads(paths[0].read_text())["summary"]["outlier_dims"] == s["outlier_dims"]
    assert "dim 507" in paths[1].read_text()
