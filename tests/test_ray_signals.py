"""SIGTERM during a Ray sweep, as a user meets it (a real CLI process, a local Ray it started): the
same clean stop as the serial run (exit 143, the "interrupted" line, finished rows kept and tabled),
and the same command resumes. Before the fix the stop cancelled the cells in flight, and a cancel
racing a cell's completion aborted the driver inside Ray's core (TaskManager::CompletePendingTask)
in about one stop in four, losing the tables."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

from reliability_common import REPO, corpus_text, save_tiny_model, subprocess_env, write_config

N_SQ = 8  # cells enough that some are in flight when the signal comes


def _rows(path):
    return path.read_text().splitlines() if path.exists() else []


def _cli(cfg, log):
    with open(log, "a") as f:
        return subprocess.Popen([sys.executable, "-m", "quantbench.cli", "run", "-c", str(cfg)], stdout=f,
                                stderr=subprocess.STDOUT, env=subprocess_env(), cwd=REPO)


def test_sigterm_during_a_ray_sweep_keeps_rows_and_tables_and_exits_143(tmp_path):
    model = save_tiny_model(tmp_path / "model")
    (tmp_path / "corpus.txt").write_text(corpus_text())
    recipes = ["fp"] + [{"preset": "w8a8-token", "name": f"sq{i}",
                         "mitigations": [{"name": "smoothquant", "options": {"alpha": 0.3 + i / 50}}]}
                        for i in range(N_SQ)]
    cfg = write_config(tmp_path, model, tmp_path / "corpus.txt", recipes=recipes,
                       executor={"kind": "ray", "local_cpus": 2})
    run = tmp_path / "out" / "r"
    log = tmp_path / "log"
    proc = _cli(cfg, log)
    t0 = time.monotonic()
    while len(_rows(run / "rows.jsonl")) < 3:
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() - t0 < 240, "the sweep never wrote three rows"
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=120)
    text = log.read_text()
    assert rc == 143, text[-3000:]
    assert text.strip().splitlines()[-1] == "interrupted; rerun the same command to resume (SIGTERM)"
    assert "Traceback" not in text and "Check failed" not in text
    kept = _rows(run / "rows.jsonl")
    assert 3 <= len(kept) < 1 + N_SQ
    tabled = (run / "results.csv").read_text().splitlines()[1:]
    assert len(tabled) == len(kept)  # every finished row is in the table written at the stop

    assert _cli(cfg, log).wait(timeout=600) == 0, log.read_text()[-3000:]
    rows = _rows(run / "rows.jsonl")
    assert rows[:len(kept)] == kept  # resumed, not recomputed
    assert sorted(json.loads(r)["recipe"] for r in rows) == sorted(["fp"] + [f"sq{i}" for i in range(N_SQ)])
