"""calibration.mode: sequential collects the same input statistics as the all-at-once pass on the FP
model (one decoder layer at a time, holding one layer's inputs), for every linear and the output head."""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from test_pipeline import _cfg, text_file, tiny_dir  # noqa: F401  (fixtures)

from quantbench.modeling.surgery import linear_modules
from quantbench.quant.calibration import StatsRequest, collect_input_stats
from quantbench.quant.sequential import sequential_input_stats
from quantbench.run import pipeline


@pytest.mark.parametrize("kind", ["llama", "gpt2", "qwen2"])
def test_sequential_statistics_equal_the_parallel_ones(kind):
    model = tiny_model(kind, layers=3)
    mods = dict(linear_modules(model))  # every linear, the output head included
    ids = torch.randint(3, 128, (5, 24), generator=torch.Generator().manual_seed(0))
    req = StatsRequest(samples=5, gram=True, token_norm=True, sample_tokens=40, skip_first=1)
    par = collect_input_stats(model, mods, ids, 2, torch.device("cpu"), req)
    seq = sequential_input_stats(model, mods, ids, 2, torch.device("cpu"), req)
    assert par.keys() == seq.keys() == mods.keys()
    for n in mods:
        a, b = par[n], seq[n]
        assert a.n == b.n and torch.equal(a.absmax, b.absmax) and torch.equal(a.absmean, b.absmean), n
        assert torch.equal(a.gram, b.gram) and torch.equal(a.sample, b.sample), n


def test_sequential_mode_gives_the_same_rows(tiny_dir, text_file, tmp_path):  # noqa: F811
    recipes = ("fp", "w8a8-tensor-static-sq", "w4a16-g64-awq")
    par = pipeline.load_rows(pipeline.run(_cfg(tiny_dir, text_file, tmp_path / "p", recipes)) / "rows.jsonl")
    cfg = _cfg(tiny_dir, text_file, tmp_path / "s", recipes)
    cfg = type(cfg).model_validate({**cfg.model_dump(mode="json"), "calibration": {"mode": "sequential"}})
    seq = pipeline.load_rows(pipeline.run(cfg) / "rows.jsonl")
    for name in recipes:
        assert {k: seq[name][k] for k in ("ppl", "kl", "top1")} == {k: par[name][k] for k in ("ppl", "kl", "top1")}
