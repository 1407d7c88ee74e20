"""Shared pieces of the reliability suite (tests/test_reliability_*.py).

A tiny random Llama with a tiny word-level tokenizer and a tiny corpus (built once per test
process), config files for it, the CLI called in-process (argv -> exit code, stdout, stderr),
and the assertions every case makes: the exit code, exactly one `error:` line holding the
expected words, no traceback, and no finished row lost or mixed.
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
WORDS = ("the model reads a sentence . then another one , and a number 42 follows "
         "while every layer keeps its own scale ; outliers appear on the first token").split()
_CACHE: dict[str, Path] = {}


def corpus_text(n_paras: int = 40, words: int = 40, shift: int = 0) -> str:
    return "\n\n".join(" ".join(WORDS[(i + j + shift) % len(WORDS)] for j in range(words)) for i in range(n_paras))


def word_tokenizer():
    """A word-level tokenizer over WORDS (ids 0-2: <unk>, <s>, </s>; fewer than 40 ids in all)."""
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *dict.fromkeys(WORDS)])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tf.PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def save_tiny_model(folder: Path, seed: int = 0) -> Path:
    """A 2-layer random Llama (hidden 32) with a word-level tokenizer over WORDS, as an HF folder."""
    import torch
    import transformers as tf

    tok = word_tokenizer()
    vocab = tok.get_vocab()
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    folder.mkdir(parents=True, exist_ok=True)
    tf.LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def tiny_model(tmp_path_factory) -> Path:
    """The tiny model folder, saved once per test process (tests must not modify it: copy it)."""
    if "model" not in _CACHE:
        _CACHE["model"] = save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")
    return _CACHE["model"]


def write_config(folder: Path, model: Path | str, corpus_file: Path | str, **over) -> Path:
    """A run config for the tiny model: 3 cheap recipes, no census (unless asked), no tasks."""
    cfg = {"model": str(model), "output_dir": str(folder / "out"), "run_id": "r",
           "corpus": {"name": str(corpus_file), "calib_samples": 2, "calib_seq_len": 16},
           "eval": {"seq_len": 32, "max_windows": 2, "batch_size": 2, "probe_windows": 0, "word_ppl": False},
           "census": {"enabled": False, "samples": 1, "seq_len": 16, "plots": False},
           "tasks": {"names": []},
           "recipes": ["fp", "w8a8-token", "w4a16-channel"]}
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    path = folder / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def template_run(tmp_path_factory, recipes: tuple[str, ...]) -> Path:
    """A finished run of the tiny model (made once per test process and recipe list) whose run
    directory tests copy: the copy resumes like the original, since rows are keyed by content."""
    key = "run:" + ",".join(recipes)
    if key not in _CACHE:
        from quantbench.cli import main

        root = tmp_path_factory.mktemp("template")
        (root / "corpus.txt").write_text(corpus_text())
        try:
            main(["run", "-c", str(write_config(root, tiny_model(tmp_path_factory), root / "corpus.txt",
                                                recipes=list(recipes)))])
        except SystemExit as e:
            raise AssertionError(f"template run failed ({e.code})") from None
        _CACHE[key] = root / "out" / "r"
    return _CACHE[key]


@dataclass
class Result:
    rc: int
    out: str
    err: str

    @property
    def error_lines(self) -> list[str]:
        return [ln for ln in self.err.splitlines() if ln.startswith("error:")]


def cli(capsys, *argv: str) -> Result:
    """`quantbench ARGV` in this process: the real entry point, its exit code and output."""
    from quantbench.cli import main

    capsys.readouterr()
    try:
        main([str(a) for a in argv])
        rc = 0
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    got = capsys.readouterr()
    return Result(rc, got.out, got.err)


def assert_error(res: Result, *words: str, rc: int = 2) -> str:
    """Exit code `rc`, exactly one `error:` line (the last line of stderr) holding every word, no traceback."""
    assert res.rc == rc, (res.rc, res.err[-2000:])
    assert "Traceback" not in res.err and "╭" not in res.err, res.err[-2000:]
    assert len(res.error_lines) == 1, res.err[-2000:]
    line = res.error_lines[0]
    assert res.err.rstrip("\n").splitlines()[-1] == line, res.err[-2000:]
    for w in words:
        assert w in line, (w, line)
    return line


def rows_lines(run_dir: Path) -> list[str]:
    p = run_dir / "rows.jsonl"
    return p.read_text().splitlines() if p.exists() else []


def rows_by_recipe(run_dir: Path) -> dict[str, dict]:
    return {r["recipe"]: r for r in map(json.loads, rows_lines(run_dir))}


def assert_rows_consistent(run_dir: Path) -> dict[str, dict]:
    """Every line of rows.jsonl parses, and all rows come from the same inputs (nothing mixed)."""
    rows = [json.loads(ln) for ln in rows_lines(run_dir)]
    assert len({r["inputs_key"] for r in rows}) <= 1, "rows from different inputs are mixed"
    return {r["recipe"]: r for r in rows}


def results_recipes(run_dir: Path) -> list[str]:
    import pandas as pd

    return list(pd.read_csv(run_dir / "results.csv")["recipe"])


def subprocess_env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "TRANSFORMERS_VERBOSITY": "error", "PYTHONUNBUFFERED": "1"}
    return env


def run_cli_subprocess(*argv: str, timeout: float = 60) -> Result:
    proc = subprocess.run([sys.executable, "-m", "quantbench.cli", *argv], capture_output=True, text=True,
                          timeout=timeout, env=subprocess_env(), cwd=REPO)
    return Result(proc.returncode, proc.stdout, proc.stderr)


# ---------------------------------------------------------------- child processes for the signal tests
DRIVER = Path(__file__).with_name("reliability_driver.py")
_CHILDREN: dict[str, "Child"] = {}


@dataclass
class Child:
    """A `quantbench run` child process (reliability_driver.py) that waits at a known point."""

    proc: subprocess.Popen
    root: Path
    cfg: Path
    ready: Path
    log: Path

    @property
    def out(self) -> Path:
        return self.root / "out" / "r"

    def wait_ready(self, timeout: float = 300) -> None:
        t0 = time.monotonic()
        while not self.ready.exists():
            if self.proc.poll() is not None:
                pytest.fail(f"driver exited early ({self.proc.returncode}): {self.log.read_text()[-2000:]}")
            if time.monotonic() - t0 > timeout:
                pytest.fail("driver never reached its pause point")
            time.sleep(0.05)

    def stop(self, sig: int) -> tuple[int, str]:
        self.proc.send_signal(sig)
        rc = self.proc.wait(timeout=120)
        return rc, self.log.read_text()


def _ctrl_c_as_at_a_terminal() -> None:
    """The child gets SIGINT's default disposition, so Python turns Ctrl-C into KeyboardInterrupt as
    at a terminal. A test run started in the background of a shell (`cmd &`) inherits SIGINT ignored,
    and the Ctrl-C test's child then never stopped."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_children(tmp_path_factory) -> dict[str, Child]:
    """Start (once per test process) the three drivers: Ctrl-C, SIGTERM and kill -9 targets.
    Their torch imports take seconds, so they are started early and run beside other tests."""
    if _CHILDREN:
        return _CHILDREN
    model = tiny_model(tmp_path_factory)
    for name, mode in (("int", "pause"), ("term", "pause"), ("kill", "cut")):
        root = tmp_path_factory.mktemp(f"kill-{name}")
        (root / "corpus.txt").write_text(corpus_text())
        cfg = write_config(root, model, root / "corpus.txt")
        log = root / "child.log"
        with open(log, "w") as f:
            proc = subprocess.Popen([sys.executable, str(DRIVER), mode, str(root / "ready"), "w8a8-token",
                                     "run", "-c", str(cfg)], stdout=f, stderr=subprocess.STDOUT,
                                    env=subprocess_env(), cwd=REPO, preexec_fn=_ctrl_c_as_at_a_terminal)
        _CHILDREN[name] = Child(proc, root, cfg, root / "ready", log)
    atexit.register(stop_children)
    return _CHILDREN


def stop_children() -> None:
    for kid in _CHILDREN.values():
        if kid.proc.poll() is None:
            kid.proc.kill()
            kid.proc.wait()


@pytest.fixture
def env(tmp_path, tmp_path_factory):
    """(root, a private copy of the tiny model, a corpus file)."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model(tmp_path_factory), model)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(corpus_text())
    return tmp_path, model, corpus
