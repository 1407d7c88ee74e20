"""Decode-order scoring in rows (eval.kv_decode_chunk): rows of recipes that quantize K/V get kv_decode_ppl (the
KV cache filled chunk by chunk, as an engine serves) and kv_decode_delta_pct (vs the row's whole-prefill ppl);
other rows keep their keys. The value is checked against a cache loop written here, not evaluate_lm's."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import save_tiny_llama, tiny_model
from transformers.cache_utils import DynamicCache

from quantbench.data.corpus import Windows
from quantbench.eval.suite import EvalSuite
from quantbench.quant.apply import apply_recipe
from quantbench.quant.spec import QuantSpec, Recipe
from quantbench.run import pipeline
from quantbench.run.config import parse_config

CPU = torch.device("cpu")
DECODE = ("kv_decode_ppl", "kv_decode_delta_pct")
# a dynamic per-tensor cache scale spans the tokens of one update: decode order and whole prefill differ
KV_TENSOR_DYN = QuantSpec(bits=8, format="fp8", granularity="tensor", dynamic=True)
RECIPE = Recipe(name="kv-tensor-dyn", weights=QuantSpec(bits=8, format="fp8"), kv=KV_TENSOR_DYN, kv_at="cache")


@torch.no_grad()
def _loop_ppl(model, ids: torch.Tensor, score_from: list[int], chunk: int) -> float:
    """exp(mean NLL) of every window scored from score_from, each window run alone through a DynamicCache
    filled `chunk` tokens at a time."""
    nll, n = 0.0, 0
    for row, s in zip(ids, score_from):
        cache, parts = DynamicCache(), []
        for a in range(0, len(row), chunk):
            parts.append(model(input_ids=row[None, a: a + chunk], past_key_values=cache, use_cache=True).logits[0])
        logits = torch.cat(parts).double()  # [T, V]; position j predicts row[j + 1]
        lp = torch.log_softmax(logits[s:-1], -1).gather(-1, row[s + 1:, None])
        nll, n = nll - float(lp.sum()), n + len(lp)
    return math.exp(nll / n)


def test_suite_decode_columns_equal_an_independent_cache_loop():
    ids = torch.randint(0, 128, (3, 40), generator=torch.Generator().manual_seed(2))
    score_from = [0, 5, 0]
    w = Windows(ids, torch.tensor(score_from), {})
    fp = tiny_model("llama", attn_implementation="sdpa")
    q, _ = apply_recipe(tiny_model("llama", attn_implementation="sdpa"), RECIPE, ids[:2], batch_size=2)
    suite = EvalSuite(w, batch_size=2, device=CPU, tokenizer=None, probe_windows=0, ci_block=16, kv_decode_chunk=3)
    suite.reference(fp)
    res, row = suite.score(q, kv=True)
    _, plain = suite.score(q)  # not a KV recipe's row: no decode columns
    suite.kv_decode_chunk = None
    _, off = suite.score(q, kv=True)  # option off
    suite.close()
    want = _loop_ppl(q, ids, score_from, 3)
    assert row["kv_decode_ppl"] == pytest.approx(want, rel=1e-5)
    assert row["kv_decode_delta_pct"] == 100 * (row["kv_decode_ppl"] / res.ppl - 1)
    assert row["kv_decode_delta_pct"] == pytest.approx(100 * (want / res.ppl - 1), abs=1e-4)  # 1e-6 relative ppl
    assert res.ppl == pytest.approx(_loop_ppl(q, ids, score_from, 40), rel=1e-5)  # one chunk = whole prefill
    assert abs(row["kv_decode_delta_pct"]) > 1e-3  # the order matters for this scheme
    assert not set(DECODE) & (set(plain) | set(off)) and set(row) - set(plain) == set(DECODE)


def test_pipeline_adds_decode_columns_only_to_kv_rows(tmp_path):
    model = save_tiny_llama(tmp_path / "tiny")
    corpus = tmp_path / "corpus.txt"
    words = "the model reads a sentence . then another one , and a number 42 follows \n".split(" ")
    corpus.write_text("\n\n".join(" ".join(words[(i + j) % len(words)] for j in range(60)) for i in range(40)))
    fp8_token = {"bits": 8, "format": "fp8", "granularity": "token", "dynamic": True}  # no int rounding ties
    kv_proj = {"name": "w8a8-kv8-proj", "weights": {"bits": 8, "format": "fp8", "granularity": "channel"},
               "activations": fp8_token, "kv": fp8_token}
    cfg = parse_config({
        "model": str(model), "output_dir": str(tmp_path / "out"), "run_id": "t",
        "corpus": {"name": str(corpus), "calib_samples": 2, "calib_seq_len": 32},
        "eval": {"seq_len": 32, "max_windows": 2, "batch_size": 2, "probe_windows": 0, "kv_decode_chunk": 8},
        "census": {"enabled": False}, "recipes": ["fp", "w8a8-token", "w8a8-fp8-kv8", kv_proj]})
    out = pipeline.run(cfg)
    rows = pipeline.load_rows(out / "rows.jsonl")
    assert all(r["status"] == "ok" for r in rows.values())
    for name, r in rows.items():
        kv = name in ("w8a8-fp8-kv8", "w8a8-kv8-proj")
        assert (set(DECODE) <= set(r)) == kv and (not set(DECODE) & set(r)) == (not kv), name
    for name in ("w8a8-fp8-kv8", "w8a8-kv8-proj"):  # per-token and static scales: the order does not matter
        r = rows[name]
        assert r["kv_decode_delta_pct"] == pytest.approx(100 * (r["kv_decode_ppl"] / r["ppl"] - 1))
        assert abs(r["kv_decode_delta_pct"]) < 1e-3
