"""Reliability under real signals: Ctrl-C (SIGINT), SIGTERM, kill -9 and a second process
writing the same run directory. Three child processes (tests/reliability_driver.py) run the real
CLI on the tiny model at once and are stopped at a known point; the checks and the resumed runs
happen in this process."""
from __future__ import annotations

import json
import os
import signal

import pytest
from reliability_common import (
    Child,
    assert_error,
    assert_rows_consistent,
    cli,
    results_recipes,
    rows_by_recipe,
    rows_lines,
    start_children,
    stop_children,
)

RECIPES = ["fp", "w8a8-token", "w4a16-channel"]


@pytest.fixture(scope="module")
def children(tmp_path_factory):
    """The three drivers (started early by test_reliability_cli.py when the whole suite runs)."""
    yield start_children(tmp_path_factory)
    stop_children()


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
    assert "taking over" not in res.err, "a clean stop releases its lock"
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
