"""Reliability of the run directory: resume after damage, rows keyed by what produced them,
full disks, the run lock, and Ctrl-C -- in this process (the real-signal cases are in
test_reliability_kill.py). Each case: exit code, the one line, no finished row lost or mixed."""
from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
from reliability_common import (
    assert_error,
    assert_rows_consistent,
    cli,
    corpus_text,
    env,
    results_recipes,
    rows_by_recipe,
    rows_lines,
    save_tiny_model,
    template_run,
    tiny_model,
    write_config,
)

from quantbench.eval.suite import EvalSuite
from quantbench.quant.backends import BackendUnavailable
from quantbench.run import cell, prepare, rundir

RECIPES = ["fp", "w8a8-token", "w4a16-channel"]



@pytest.fixture
def calls(monkeypatch):
    """Names of the recipes whose work actually runs (the FP row comes from the reference pass)."""
    seen: list[str] = []
    real_ref, real_run = EvalSuite.reference, cell._run_recipe
    monkeypatch.setattr(EvalSuite, "reference", lambda self, m: seen.append("fp") or real_ref(self, m))
    monkeypatch.setattr(cell, "_run_recipe", lambda m, r, *a, **k: seen.append(r.name) or real_run(m, r, *a, **k))
    return seen


def run(capsys, env, **over):
    root, model, corpus = env
    return cli(capsys, "run", "-c", write_config(root, over.pop("model", model), corpus, **over))


@pytest.fixture
def done(env, calls, tmp_path_factory):
    """A finished 3-recipe run of this test's model copy and corpus (a copy of one made once)."""
    out = env[0] / "out" / "r"
    shutil.copytree(template_run(tmp_path_factory, tuple(RECIPES)), out)
    calls.clear()  # the template's own run, when made now, is not a rerun's work
    return out


def _ok_rerun(capsys, env, **over):
    res = run(capsys, env, **over)
    assert res.rc == 0, res.err[-3000:]
    return res


# ---------------------------------------------------------------- rows.jsonl damage
def test_truncated_last_line_is_repaired_and_only_that_recipe_recomputed(capsys, env, done, calls):
    lines = rows_lines(done)
    (done / "rows.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][: len(lines[2]) // 2])
    res = _ok_rerun(capsys, env)
    assert "dropped an incomplete last line" in res.err
    assert calls == ["fp", "w4a16-channel"]  # fp: the reference pass the new row is compared with
    assert rows_lines(done)[:2] == lines[:2] and len(rows_lines(done)) == 3
    assert set(assert_rows_consistent(done)) == set(RECIPES)


def test_complete_last_line_without_newline_is_kept(capsys, env, done, calls):
    text = (done / "rows.jsonl").read_text()
    (done / "rows.jsonl").write_text(text.rstrip("\n"))
    _ok_rerun(capsys, env, recipes=RECIPES + ["w8a8-tensor-dynamic"])
    assert calls == ["fp", "w8a8-tensor-dynamic"]
    assert rows_lines(done)[:3] == text.splitlines() and len(rows_lines(done)) == 4


def test_corrupt_middle_line_is_refused_and_left_alone(capsys, env, done, calls):
    lines = rows_lines(done)
    lines[1] = lines[1][:40] + "\x00" * 8 + lines[1][48:]  # a block of zeros, as a damaged disk leaves
    (done / "rows.jsonl").write_text("\n".join(lines) + "\n")
    before = (done / "rows.jsonl").read_bytes()
    assert_error(run(capsys, env), "rows.jsonl line 2 is not a valid row", "delete that line")
    assert (done / "rows.jsonl").read_bytes() == before and calls == []


def test_rows_line_not_utf8(capsys, env, done):
    data = (done / "rows.jsonl").read_bytes()
    cut = data.index(b"\n") + 20
    (done / "rows.jsonl").write_bytes(data[:cut] + b"\xff\xfe" + data[cut + 2:])
    assert_error(run(capsys, env), "rows.jsonl line 2 is not a valid row")


def test_rows_line_without_recipe(capsys, env, done):
    with open(done / "rows.jsonl", "a") as f:
        f.write("[1, 2, 3]\n")
    assert_error(run(capsys, env), "rows.jsonl line 4 is not a valid row (no recipe name)")


# ---------------------------------------------------------------- derived files
def test_truncated_census_is_recomputed(capsys, env, calls):
    res = run(capsys, env, census={"enabled": True})
    assert res.rc == 0, res.err
    out = env[0] / "out" / "r"
    census = json.loads((out / "census.json").read_text())
    (out / "census.json").write_text((out / "census.json").read_text()[:200])
    calls.clear()
    res = _ok_rerun(capsys, env, census={"enabled": True})
    assert "census.json is damaged or from other inputs: discarded, recomputed" in res.err
    assert json.loads((out / "census.json").read_text())["summary"] == census["summary"]
    assert calls == []  # no row recomputed


def test_damaged_census_with_census_off_is_discarded(capsys, env, done):
    (done / "census.json").write_text("{")
    res = _ok_rerun(capsys, env)
    assert "discarded" in res.err and not (done / "census.json").exists()
    assert cli(capsys, "recommend", done).rc == 0


def test_damaged_manifest_config_and_state_are_rewritten(capsys, env, done, calls):
    for name in ("manifest.json", "config.yaml", "inputs.json", "results.csv"):
        (done / name).write_text((done / name).read_text()[:25])
    rows = rows_lines(done)
    _ok_rerun(capsys, env)
    assert calls == [] and rows_lines(done) == rows
    assert json.loads((done / "manifest.json").read_text())["inputs_key"] == json.loads(rows[0])["inputs_key"]
    assert results_recipes(done) == RECIPES


# ---------------------------------------------------------------- rows keyed by what produced them
def _assert_fresh(res, done, stale_lines, *what):
    assert f"inputs changed since {len(stale_lines)} row(s) were computed" in res.err
    for w in what:
        assert w in res.err, (w, res.err[-1500:])
    assert (done / "rows.stale.jsonl").read_text().splitlines() == stale_lines
    rows = assert_rows_consistent(done)
    assert set(rows) == set(RECIPES) and not {r["inputs_key"] for r in rows.values()} & {
        json.loads(s)["inputs_key"] for s in stale_lines}
    return rows


def test_changed_corpus_starts_fresh_rows(capsys, env, done, calls):
    old = rows_lines(done)
    env[2].write_text(corpus_text(shift=3))
    res = _ok_rerun(capsys, env)
    rows = _assert_fresh(res, done, old, "corpus.calib", "corpus.eval")
    assert calls == RECIPES and rows["fp"]["ppl"] != json.loads(old[0])["ppl"]


def test_tables_of_stale_rows_go_with_them(capsys, env, done, monkeypatch):
    env[2].write_text(corpus_text(shift=5))

    def interrupted(self, model):
        raise KeyboardInterrupt

    monkeypatch.setattr(EvalSuite, "reference", interrupted)
    res = run(capsys, env)
    assert res.rc == 130 and "stopped: 0 of 3 recipe(s) finished" in res.err
    assert not (done / "results.csv").exists() and not (done / "report.html").exists()
    assert rows_lines(done) == [] and len((done / "rows.stale.jsonl").read_text().splitlines()) == 3
    assert_error(cli(capsys, "compare", done), "rows.jsonl holds no rows yet")


def test_changed_model_weights_start_fresh_rows(capsys, env, done, calls):
    old = rows_lines(done)
    save_tiny_model(env[1], seed=1)
    res = _ok_rerun(capsys, env)
    _assert_fresh(res, done, old, "model.content")
    assert calls == RECIPES


def test_changed_package_version_starts_fresh_rows(capsys, env, done, calls, monkeypatch):
    from quantbench.run import manifest

    real = manifest.package_versions
    monkeypatch.setattr(manifest, "package_versions", lambda *a: {**real(*a), "torch": "9.9.9"})
    old = rows_lines(done)
    _assert_fresh(_ok_rerun(capsys, env), done, old, "packages.torch")


def test_changed_quantbench_code_starts_fresh_rows(capsys, env, done, calls, monkeypatch):
    from quantbench.run import manifest

    monkeypatch.setattr(manifest, "code_fingerprint", lambda: "0123456789abcdef")
    old = rows_lines(done)
    _assert_fresh(_ok_rerun(capsys, env), done, old, "code")
    assert calls == RECIPES


def test_code_fingerprint_changes_with_any_source_byte_that_computes_rows(tmp_path):
    from quantbench.run import manifest

    tree = tmp_path / "quantbench"
    shutil.copytree(Path(manifest.__file__).parents[1], tree, ignore=shutil.ignore_patterns("__pycache__"))
    own = manifest.code_fingerprint()
    assert all(list(tree.glob(g)) for g in manifest.NOT_ROW_CODE)  # no typo silently keys a file
    assert manifest.tree_fingerprint(tree, manifest.NOT_ROW_CODE) == own  # the installed package's own code
    for rel in ("quant/primitives.py", "train/retrofit/grafts.py", "train/modeling.py", "cli.py"):
        f = tree / rel  # quantization, and the model classes the loader registers, compute rows
        keep = f.read_text()
        f.write_text(keep + "\n")
        assert manifest.tree_fingerprint(tree, manifest.NOT_ROW_CODE) != own, rel
        f.write_text(keep)
    for rel in ("report/tables.py", "train/loop.py", "train/retrofit/run.py"):
        f = tree / rel  # tables are rebuilt from rows; training procedures make no sweep row
        f.write_text(f.read_text() + "\n")
        assert manifest.tree_fingerprint(tree, manifest.NOT_ROW_CODE) == own, rel
    assert manifest.tree_fingerprint(tree) != own  # without the exclusions every byte counts


def test_changed_setting_in_the_same_run_id_starts_fresh_rows(capsys, env, done, calls):
    old = rows_lines(done)
    res = _ok_rerun(capsys, env, eval={"max_windows": 1})
    _assert_fresh(res, done, old, "settings.eval.max_windows")


def test_rows_without_an_inputs_key_are_not_trusted(capsys, env, done, calls):
    legacy = [json.dumps({k: v for k, v in json.loads(ln).items() if k != "inputs_key"}) for ln in rows_lines(done)]
    (done / "rows.jsonl").write_text("\n".join(legacy) + "\n")
    res = _ok_rerun(capsys, env)
    assert "inputs changed since 3 row(s)" in res.err and calls == RECIPES
    assert (done / "rows.stale.jsonl").read_text().splitlines() == legacy


def test_changed_recipe_is_recomputed_alone(capsys, env, done, calls):
    before = rows_by_recipe(done)
    changed = {"name": "w4a16-channel", "weights": {"bits": 4, "granularity": "channel", "symmetric": False}}
    _ok_rerun(capsys, env, recipes=["fp", "w8a8-token", changed])
    assert calls == ["fp", "w4a16-channel"]
    after = rows_by_recipe(done)
    assert after["w8a8-token"] == before["w8a8-token"] and after["fp"] == before["fp"]
    assert after["w4a16-channel"]["recipe_key"] != before["w4a16-channel"]["recipe_key"]


def test_skipped_row_is_retried(capsys, env, calls, monkeypatch):
    real = cell.quantize

    def unavailable(model, ctx):
        if ctx.recipe.name == "w8a8-token":
            raise BackendUnavailable("needs a CUDA device")
        return real(model, ctx)

    monkeypatch.setattr(cell, "quantize", unavailable)
    assert run(capsys, env).rc == 0
    out = env[0] / "out" / "r"
    assert rows_by_recipe(out)["w8a8-token"]["status"] == "skipped: needs a CUDA device"
    monkeypatch.setattr(cell, "quantize", real)
    calls.clear()
    _ok_rerun(capsys, env)
    assert calls == ["fp", "w8a8-token"] and rows_by_recipe(out)["w8a8-token"]["status"] == "ok"


# ---------------------------------------------------------------- full disk (a real kernel write failure)
@contextmanager
def file_size_limit(nbytes: int):
    """RLIMIT_FSIZE: a write past `nbytes` fails with EFBIG, as a full disk fails with ENOSPC."""
    old_sig = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_sig)


def _no_temp_files(folder):
    return not [p.name for p in folder.iterdir() if ".tmp-" in p.name]


def test_full_disk_at_the_report_keeps_rows_and_the_old_report(capsys, env, done, calls):
    old_report = (done / "report.html").read_bytes()
    assert len(old_report) > 8192
    with file_size_limit(8192):
        res = run(capsys, env, recipes=RECIPES + ["w8a8-tensor-dynamic"])
    assert_error(res, str(done / "report.html"), "[Errno 27]")
    assert (done / "report.html").read_bytes() == old_report and _no_temp_files(done)
    assert set(assert_rows_consistent(done)) == set(RECIPES) | {"w8a8-tensor-dynamic"}
    calls.clear()
    _ok_rerun(capsys, env, recipes=RECIPES + ["w8a8-tensor-dynamic"])
    assert calls == [] and (done / "report.html").read_bytes() != old_report


def test_full_disk_during_a_row_append_leaves_no_fragment(capsys, env, monkeypatch, calls):
    out = env[0] / "out" / "r"
    real = cell._run_recipe
    limited = []

    def fill_disk_then_return(model, recipe, *a, **k):
        row = real(model, recipe, *a, **k)
        if recipe.name == "w4a16-channel":
            limited.append((out / "rows.jsonl").read_bytes())
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (len(limited[0]) + 100, resource.RLIM_INFINITY))
        return row

    monkeypatch.setattr(cell, "_run_recipe", fill_disk_then_return)
    try:
        with file_size_limit(resource.RLIM_INFINITY):  # restores the limit and SIGXFSZ afterwards
            res = run(capsys, env)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    assert_error(res, str(out / "rows.jsonl"), "[Errno 27]")
    assert (out / "rows.jsonl").read_bytes() == limited[0], "the cut row must be removed again"
    monkeypatch.setattr(cell, "_run_recipe", real)
    assert _ok_rerun(capsys, env) and set(assert_rows_consistent(out)) == set(RECIPES)


# ---------------------------------------------------------------- the run lock
def test_a_held_lock_refuses_a_second_run(capsys, env, done, calls):
    before = rows_lines(done)
    with rundir.RunLock(done):
        assert_error(run(capsys, env), "is in use by another quantbench process", f"PID {os.getpid()}")
    assert rows_lines(done) == before and calls == []


def test_a_lock_left_by_a_dead_process_is_taken_over(capsys, env, done):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (done / rundir.LOCK_NAME).write_text(f"{dead.pid}\n")
    res = _ok_rerun(capsys, env)
    assert f"taking over the run lock left by PID {dead.pid}" in res.err


def test_a_garbled_lock_file_does_not_block(capsys, env, done):
    (done / rundir.LOCK_NAME).write_bytes(b"\xff\x00garbage")
    res = _ok_rerun(capsys, env)
    assert "taking over" not in res.err and (done / rundir.LOCK_NAME).read_text() == ""  # a clean exit clears it


# ---------------------------------------------------------------- Ctrl-C (in process)
def test_ctrl_c_keeps_finished_rows_writes_their_tables_and_exits_130(capsys, env, monkeypatch, calls):
    real = cell._run_recipe

    def interrupt(model, recipe, *a, **k):
        if recipe.name == "w4a16-channel":
            raise KeyboardInterrupt
        return real(model, recipe, *a, **k)

    monkeypatch.setattr(cell, "_run_recipe", interrupt)
    res = run(capsys, env)
    out = env[0] / "out" / "r"
    assert res.rc == 130 and res.err.strip().splitlines()[-1] == "interrupted; rerun the same command to resume"
    assert "stopped: 2 of 3 recipe(s) finished" in res.err and results_recipes(out) == ["fp", "w8a8-token"]
    kept = rows_lines(out)
    monkeypatch.setattr(cell, "_run_recipe", real)
    calls.clear()
    _ok_rerun(capsys, env)
    assert calls == ["fp", "w4a16-channel"] and rows_lines(out)[:2] == kept


def test_ctrl_c_while_loading_leaves_no_directory(capsys, env, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare, "load_model", interrupted)
    res = run(capsys, env)
    assert res.rc == 130 and "interrupted" in res.err and not (env[0] / "out").exists()
