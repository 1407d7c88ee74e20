"""The run pipeline on a tiny model: outputs, resume after interruption, determinism, bad input."""
import json

import pytest
import torch
from conftest import save_tiny_llama

from quantbench.core.errors import QuantbenchError
from quantbench.modeling.load import load_model
from quantbench.run import cell, pipeline
from quantbench.run.config import parse_config


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama saved as an HF folder with the real default tokenizer."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def text_file(tmp_path):
    p = tmp_path / "corpus.txt"
    words = "the model reads a sentence . then another one , and a number 42 follows \n".split(" ")
    p.write_text("\n\n".join(" ".join(words[(i + j) % len(words)] for j in range(60)) for i in range(80)))
    return p


def _cfg(model_dir, corpus, out, recipes=("fp", "w8a8-token", "w8a8-tensor-static", "w4a16-g64")):
    return parse_config({
        "model": str(model_dir), "output_dir": str(out), "run_id": "t",
        "corpus": {"name": str(corpus), "calib_samples": 2, "calib_seq_len": 32},
        "eval": {"seq_len": 64, "max_windows": 3, "batch_size": 2},
        "census": {"samples": 2, "seq_len": 32}, "recipes": list(recipes)})


def test_run_writes_all_outputs(tiny_dir, text_file, tmp_path):
    out = pipeline.run(_cfg(tiny_dir, text_file, tmp_path))
    for f in ("config.yaml", "manifest.json", "census.json", "rows.jsonl", "results.csv", "results.md"):
        assert (out / f).exists(), f
    man = json.loads((out / "manifest.json").read_text())
    assert man["seed"] == 0 and man["packages"]["torch"] and man["model"]["fingerprint"]
    assert man["eval_protocol"]["bos"] is True and man["eval_protocol"]["seq_len"] == 64
    assert man["corpus"]["fingerprint"]["calib"] != man["corpus"]["fingerprint"]["eval"]
    rows = pipeline.load_rows(out / "rows.jsonl")
    assert set(rows) == {"fp", "w8a8-token", "w8a8-tensor-static", "w4a16-g64"}
    assert rows["fp"]["kl"] == 0 and rows["fp"]["top1"] == 1
    assert all(r["status"] == "ok" and r["ppl"] > 1 for r in rows.values())
    assert rows["w4a16-g64"]["size_mb"] < rows["w8a8-token"]["size_mb"] < rows["fp"]["size_mb"]
    assert "w8a8-tensor-static" in (out / "results.md").read_text()


def test_interrupted_sweep_resumes_without_recomputing(tiny_dir, text_file, tmp_path, monkeypatch):
    cfg = _cfg(tiny_dir, text_file, tmp_path)
    real = cell._run_recipe
    calls = []

    def interrupt_on_third(model, recipe, *a, **k):
        calls.append(recipe.name)
        if recipe.name == "w4a16-g64":
            raise KeyboardInterrupt
        return real(model, recipe, *a, **k)

    monkeypatch.setattr(cell, "_run_recipe", interrupt_on_third)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(cfg)
    kept = pipeline.load_rows(tmp_path / "t" / "rows.jsonl")
    assert set(kept) == {"fp", "w8a8-token", "w8a8-tensor-static"}
    calls.clear()
    monkeypatch.setattr(cell, "_run_recipe", lambda *a, **k: calls.append(a[1].name) or real(*a, **k))
    pipeline.run(cfg)
    assert calls == ["w4a16-g64"]
    rows = pipeline.load_rows(tmp_path / "t" / "rows.jsonl")
    assert rows["w8a8-token"] == kept["w8a8-token"]


def test_runs_are_deterministic(tiny_dir, text_file, tmp_path):
    a = pipeline.load_rows(pipeline.run(_cfg(tiny_dir, text_file, tmp_path / "a")) / "rows.jsonl")
    b = pipeline.load_rows(pipeline.run(_cfg(tiny_dir, text_file, tmp_path / "b")) / "rows.jsonl")
    for name in a:
        assert a[name]["ppl"] == b[name]["ppl"] and a[name]["kl"] == b[name]["kl"]


def test_group_size_not_dividing_a_layer_is_rejected_before_work(tiny_dir, text_file, tmp_path):
    cfg = _cfg(tiny_dir, text_file, tmp_path, recipes=["fp", {"name": "g48", "weights": {
        "bits": 4, "granularity": "group", "group_size": 48}}])
    with pytest.raises(QuantbenchError, match=r"group_size 48 does not divide the input size 64 of layer model\.layers\.0\.self_attn\.q_proj"):
        pipeline.run(cfg)
    assert not (tmp_path / "t" / "rows.jsonl").exists()


def test_model_errors_are_one_line(tmp_path):
    with pytest.raises(QuantbenchError, match="offline alternatives") as e:
        load_model("some-org/no-such-model-xyz", device="cpu")
    assert "\n" not in str(e.value)
    with pytest.raises(QuantbenchError, match="not found"):
        load_model(str(tmp_path / "missing.gguf"), device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(QuantbenchError, match="no config.json"):
        load_model(str(tmp_path / "empty"), device="cpu")
