"""Reliability under real signals: Ctrl-C (SIGINT), SIGTERM, kill -9 and a second process
writing the same run directory. Three child processes (tests/reliability_driver.py) run the real
CLI on the tiny model at once and are stopped at a known point; the checks and the resumed runs
happen in this process."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from reliability_common import (REPO, assert_error, assert_rows_consistent, cli, corpus_text, results_recipes,
                                rows_by_recipe, rows_lines, subprocess_env, tiny_model, write_config)

DRIVER = Path(__file__).with_name("reliability_driver.py")
RECIPES = ["fp", "w8a8-token", "w4a16-channel"]


@dataclass
class Child:
    proc: subprocess.Popen
    root: Path
    cfg: Path
    ready: Path
    log: Path

    @property
    def out(self) -> Path:
        return self.root / "out" / "r"

    def wait_ready(self, timeout: float = 240) -> None:
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


@pytest.fixture(scope="module")
def children(tmp_path_factory):
    """Start the three drivers together (their imports dominate; in parallel they overlap)."""
    model = tiny_model(tmp_path_factory)
    kids = {}
    for name, mode in (("int", "pause"), ("term", "pause"), ("kill", "cut")):
        root = tmp_path_factory.mktemp(f"kill-{name}")
        (root / "corpus.txt").write_text(corpus_text())
        cfg = write_config(root, model, root / "corpus.txt")
        log = root / "child.log"
        with open(log, "w") as f:
            proc = subprocess.Popen([sys.executable, str(DRIVER), mode, str(root / "ready"), "w8a8-token",
                                     "run", "-c", str(cfg)], stdout=f, stderr=subprocess.STDOUT,
                                    env=subprocess_env(), cwd=REPO)
        kids[name] = Child(proc, root, cfg, root / "ready", log)
    yield kids
    for kid in kids.values():
        if kid.proc.poll() is None:
            kid.proc.kill()
            kid.proc.wait()


def _resume(capsys, kid: Child):
    res = cli(capsys, "run", "-c", kid.cfg)
    assert res.rc == 0, res.err[-3000:]
    return res


def test_second_run_is_refused_then_sigint_stops_cleanly_and_resume_matches_a_clean_run(capsys, children):
    kid = children["int"]
    kid.wait_ready()
    kept = rows_lines(kid.out)
    assert [json.loads(ln)["recipe"] for ln in kept] == ["fp"]
    # a second run into the same directory while the first one works
    assert_error(cli(capsys, "run", "-c", kid.cfg), "is in use by another quantbench process",
                 f"PID {kid.proc.pid}")
    assert rows_lines(kid.out) == kept
    rc, log = kid.stop(signal.SIGINT)
    assert rc == 130, log[-2000:]
    assert log.strip().splitlines()[-1] == "interrupted; rerun the same command to resume", log[-2000:]
    assert "stopped: 1 of 3 recipe(s) finished" in log and "Traceback" not in log
    assert rows_lines(kid.out) == kept and results_recipes(kid.out) == ["fp"]
    res = _resume(capsys, kid)
    assert "resuming: 1 finished row(s) kept (fp)" in res.err
    assert rows_lines(kid.out)[0] == kept[0]
    resumed = assert_rows_consistent(kid.out)
    clean = cli(capsys, "run", "-c", kid.cfg, "--run-id", "clean")
    assert clean.rc == 0
    reference = rows_by_recipe(kid.root / "out" / "clean")
    for name in RECIPES:  # the interrupted-then-resumed sweep gives the uninterrupted sweep's numbers
        assert (resumed[name]["ppl"], resumed[name]["kl"]) == (reference[name]["ppl"], reference[name]["kl"])


def test_sigterm_stops_cleanly_with_143(capsys, children):
    kid = children["term"]
    kid.wait_ready()
    kept = rows_lines(kid.out)
    rc, log = kid.stop(signal.SIGTERM)
    assert rc == 143, log[-2000:]
    assert log.strip().splitlines()[-1] == "interrupted; rerun the same command to resume (SIGTERM)"
    assert "Traceback" not in log and rows_lines(kid.out) == kept and results_recipes(kid.out) == ["fp"]
    res = _resume(capsys, kid)
    assert "resuming: 1 finished row(s) kept (fp)" in res.err
    assert set(assert_rows_consistent(kid.out)) == set(RECIPES) and rows_lines(kid.out)[0] == kept[0]


def test_kill_9_mid_append_then_rerun_repairs_the_tail_and_takes_over_the_lock(capsys, children):
    kid = children["kill"]
    kid.wait_ready()
    os.kill(kid.proc.pid, signal.SIGKILL)
    assert kid.proc.wait(timeout=60) == -signal.SIGKILL
    data = (kid.out / "rows.jsonl").read_bytes()
    assert not data.endswith(b"\n"), "the kill must have left a cut line"
    fp_line = data.split(b"\n")[0].decode()
    res = _resume(capsys, kid)
    assert "dropped an incomplete last line" in res.err
    assert f"taking over the run lock left by PID {kid.proc.pid}" in res.err
    assert rows_lines(kid.out)[0] == fp_line and "resuming: 1 finished row(s) kept (fp)" in res.err
    assert set(assert_rows_consistent(kid.out)) == set(RECIPES)
