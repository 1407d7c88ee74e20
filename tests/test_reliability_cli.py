"""Reliability: CLI misuse, bad configs, bad output paths, damaged result files read by compare/recommend.

Every case asserts the exit code, the one `error:` line and its words, and that nothing was
created or lost. Usage errors run the real console entry point in a subprocess (the installed
typer bundles its own click, so only the real process shows what a user sees); the other cases
call the same entry point in this process.
"""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from reliability_common import (
    REPO,
    assert_error,
    cli,
    corpus_text,
    results_recipes,
    rows_lines,
    start_children,
    subprocess_env,
    template_run,
    tiny_model,
    write_config,
)


@pytest.fixture(scope="module", autouse=True)
def _start_signal_children_early(request, tmp_path_factory):
    """When test_reliability_kill.py is in this session, start its child processes now: they spend
    seconds importing torch, and do so beside this module's tests instead of after them."""
    if any(item.path.name == "test_reliability_kill.py" for item in request.session.items):
        start_children(tmp_path_factory)


# ---------------------------------------------------------------- usage errors (subprocesses)
USAGE = [  # argv, words in the error line, words in the usage line
    (["frobnicate"], ["No such command 'frobnicate'"], ["Usage: quantbench", "quantbench --help"]),
    (["run", "--bogus"], ["No such option: --bogus"], ["Usage: quantbench run", "quantbench run --help"]),
    (["run", "extra"], ["unexpected extra argument", "extra"], ["Usage: quantbench run"]),
    (["compare"], ["Missing argument"], ["Usage: quantbench compare"]),
    (["run", "--config"], ["--config", "requires an argument"], ["Usage: quantbench run"]),
    (["assets", "fetchh"], ["No such command 'fetchh'"], ["Usage: quantbench assets"]),
    (["assets", "path"], ["Missing argument"], ["Usage: quantbench assets path"]),
    (["assets", "fetch", "--forse"], ["No such option: --forse"], ["Usage: quantbench assets fetch"]),
]


@pytest.fixture(scope="module")
def usage_results():
    """All usage-error subprocesses at once (they import typer only, not torch)."""
    procs = [subprocess.Popen([sys.executable, "-m", "quantbench.cli", *argv], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=subprocess_env(), cwd=REPO)
             for argv, _, _ in USAGE]
    procs += [subprocess.Popen([sys.executable, "-m", "quantbench.cli", *argv], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=subprocess_env(), cwd=REPO)
              for argv in ([], ["assets"])]
    return [(p.returncode, *p.communicate(timeout=60)) if p.wait(timeout=60) is not None else None for p in procs]


@pytest.mark.parametrize("i", range(len(USAGE)), ids=[" ".join(a) or "-" for a, _, _ in USAGE])
def test_usage_error_is_one_error_line_and_the_usage_hint(usage_results, i):
    rc, out, err = usage_results[i]
    _, words, usage_words = USAGE[i]
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert "Traceback" not in err and "╭" not in err and len(lines) == 2, err
    assert lines[0].startswith("error: ") and all(w in lines[0] for w in words), lines
    assert all(w in lines[1] for w in usage_words), lines
    assert out == ""


@pytest.mark.parametrize("i, what", [(len(USAGE), "quantbench"), (len(USAGE) + 1, "quantbench assets")])
def test_bare_command_prints_help_and_exits_0(usage_results, i, what):
    rc, out, err = usage_results[i]
    assert rc == 0 and err == ""
    assert f"Usage: {what} [OPTIONS] COMMAND" in out and "fetch" in out or "run" in out


# ---------------------------------------------------------------- bad configs (in-process)
@pytest.fixture
def setup(tmp_path, tmp_path_factory):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(corpus_text())
    return tmp_path, tiny_model(tmp_path_factory), corpus


def _config_case(capsys, setup, text: str, *words: str):
    root, _, _ = setup
    cfg = root / "bad.yaml"
    cfg.write_text(text)
    line = assert_error(cli(capsys, "run", "-c", cfg, "--out", root / "out"), *words)
    assert not (root / "out").exists(), "a failed run must not leave a directory"
    return line


def test_yaml_syntax_error_keeps_line_and_column(capsys, setup):
    _config_case(capsys, setup, "model: default\neval:\n  seq_len: [64\n  stride: 8\n",
                 "not valid YAML", "line 4, column", "bad.yaml")


def test_yaml_tab_error_keeps_line_and_column(capsys, setup):
    _config_case(capsys, setup, "model: default\n\tseed: 1\n", "not valid YAML", "line 2, column 1",
                 "cannot start any token")


def test_recipe_error_names_the_recipe(capsys, setup):
    _config_case(capsys, setup, "recipes:\n- fp\n- w8a8-token\n- {name: my-w8a8, weights: {bits: 9}}\n",
                 "config: recipes[2] (my-w8a8): weights.bits:", "less than or equal to 8")


def test_unknown_preset_names_the_recipe(capsys, setup):
    _config_case(capsys, setup, "recipes: [fp, w9a9]\n", "config: recipes[1] (w9a9): unknown preset 'w9a9'")


def test_unknown_recipe_key_names_the_recipe(capsys, setup):
    _config_case(capsys, setup, "recipes: [fp, {preset: w8a8-token, name: x, wieghts: {bits: 8}}]\n",
                 "recipes[1] (x): wieghts: unknown key")


def test_unknown_top_level_key(capsys, setup):
    _config_case(capsys, setup, "model: default\nevall: {seq_len: 64}\n", "config: evall: unknown key")


def test_config_not_a_mapping(capsys, setup):
    _config_case(capsys, setup, "- fp\n- w8a8-token\n", "must be a mapping")


def test_config_binary_garbage(capsys, setup):
    root, _, _ = setup
    (root / "bad.yaml").write_bytes(b"\xff\xfe\x00garbage\x81")
    line = assert_error(cli(capsys, "run", "-c", root / "bad.yaml"), "cannot read config", "not UTF-8")
    assert "bad.yaml" in line


def test_config_missing_and_config_is_a_folder(capsys, setup):
    root, _, _ = setup
    assert_error(cli(capsys, "run", "-c", root / "nope.yaml"), "config file not found", "nope.yaml")
    assert_error(cli(capsys, "run", "-c", root), "cannot read config", "Errno 21")


def test_duplicate_and_empty_recipes(capsys, setup):
    _config_case(capsys, setup, "recipes: [fp, fp]\n", "recipe names must be unique", "fp")
    _config_case(capsys, setup, "recipes: []\n", "recipes: must be a non-empty list")


@pytest.mark.parametrize("run_id", ["..", ".", "/tmp/elsewhere", "a/b", "../up", ""])
def test_run_id_with_path_parts_is_refused(capsys, setup, run_id):
    """A run id is the folder under the output root: '..', '.', an absolute path or a nested path wrote
    outside the root or into it directly (issue 21)."""
    root, model, corpus = setup
    cfg = write_config(root, model, corpus)
    assert_error(cli(capsys, "run", "-c", cfg, "--run-id", run_id), "run_id", "plain folder name")
    assert not (root / "out").exists()


def test_ray_address_without_the_ray_executor_is_refused(capsys, setup):
    root, model, corpus = setup
    cfg = write_config(root, model, corpus)
    assert_error(cli(capsys, "run", "-c", cfg, "--ray-address", "auto"), "executor is serial", "--executor ray")
    assert not (root / "out").exists()


def test_stride_longer_than_window(capsys, setup):
    _config_case(capsys, setup, "eval: {seq_len: 32, stride: 64}\n", "eval:", "stride (64) must not exceed seq_len (32)")


def test_missing_include_path_is_an_error_even_for_pack_tasks(capsys, setup):
    root, model, corpus = setup
    cfg = write_config(root, model, corpus, tasks={"names": ["qb_wiki_cloze"],
                                                   "include_path": str(root / "my_tasks")})
    assert_error(cli(capsys, "run", "-c", cfg), "tasks.include_path", "my_tasks")
    assert not (root / "out").exists()


def test_group_size_not_dividing_a_layer_leaves_no_directory(capsys, setup):
    root, model, corpus = setup
    cfg = write_config(root, model, corpus, recipes=["fp", {"name": "g48", "weights": {
        "bits": 4, "granularity": "group", "group_size": 48}}])
    assert_error(cli(capsys, "run", "-c", cfg), "group_size 48 does not divide")
    assert not (root / "out").exists()


# ---------------------------------------------------------------- output paths
def test_out_is_an_existing_file(capsys, setup):
    root, model, corpus = setup
    (root / "taken").write_text("mine")
    cfg = write_config(root, model, corpus)
    assert_error(cli(capsys, "run", "-c", cfg, "--out", root / "taken", "--run-id", "x"), "taken", "is a file")
    assert (root / "taken").read_text() == "mine"
    assert_error(cli(capsys, "run", "-c", cfg, "--out", root, "--run-id", "taken"), "exists and is not a directory")
    assert (root / "taken").read_text() == "mine"


def test_out_below_a_file(capsys, setup):
    root, model, corpus = setup
    (root / "file.txt").write_text("x")
    cfg = write_config(root, model, corpus)
    assert_error(cli(capsys, "run", "-c", cfg, "--out", root / "file.txt" / "results"), "file.txt", "is a file")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc")
def test_out_where_no_folder_can_be_made(capsys, setup):
    root, model, corpus = setup
    line = assert_error(cli(capsys, "run", "-c", write_config(root, model, corpus), "--out", "/proc/qb-out"),
                        "/proc/qb-out")
    assert "Errno" in line or "not writable" in line


def test_profile_out_is_a_file(capsys, setup):
    root, model, corpus = setup
    (root / "prof").write_text("x")
    assert_error(cli(capsys, "profile", "--model", model, "--corpus", corpus, "--out", root / "prof"),
                 "exists and is not a directory")


# ---------------------------------------------------------------- damaged run directories read by compare / recommend
@pytest.fixture
def finished_run(setup, tmp_path_factory):
    """A copy of a finished 2-recipe run directory (the run is made once)."""
    out = setup[0] / "out" / "r"
    shutil.copytree(template_run(tmp_path_factory, ("fp", "w8a8-token")), out)
    return out


def test_truncated_results_csv_names_file_and_line(capsys, finished_run):
    csv = finished_run / "results.csv"
    text = csv.read_text()
    csv.write_text(text[: len(text) - 40])
    n_lines = text[: len(text) - 40].count("\n") + 1
    assert_error(cli(capsys, "compare", finished_run), "results.csv", f"line {n_lines}", "truncated")
    assert_error(cli(capsys, "recommend", finished_run), "results.csv", f"line {n_lines}")


def test_results_csv_with_a_broken_row(capsys, finished_run):
    csv = finished_run / "results.csv"
    lines = csv.read_text().splitlines(keepends=True)
    lines[2] = "w8a8-token,ok,oops\n"
    csv.write_text("".join(lines))
    assert_error(cli(capsys, "compare", finished_run), "results.csv line 3", "fields")


def test_results_csv_not_text(capsys, finished_run):
    csv = finished_run / "results.csv"
    data = bytearray(csv.read_bytes())
    data[len(data) // 2] = 0xFF
    csv.write_bytes(bytes(data))
    assert_error(cli(capsys, "recommend", finished_run), "results.csv line", "not UTF-8")


def test_empty_results_csv(capsys, finished_run):
    (finished_run / "results.csv").write_text("")
    assert_error(cli(capsys, "compare", finished_run), "results.csv is empty")


def test_damaged_rows_jsonl_without_results_csv(capsys, finished_run):
    (finished_run / "results.csv").unlink()
    rows = finished_run / "rows.jsonl"
    lines = rows.read_text().splitlines(keepends=True)
    rows.write_text(lines[0][:30] + "\n" + lines[1])
    assert_error(cli(capsys, "compare", finished_run), "rows.jsonl line 1 is not a valid row")


def test_rows_jsonl_only_is_read_when_results_csv_is_missing(capsys, finished_run):
    (finished_run / "results.csv").unlink()
    res = cli(capsys, "compare", finished_run)
    assert res.rc == 0 and "w8a8-token" in res.out


def test_compare_missing_run_dir(capsys, tmp_path):
    assert_error(cli(capsys, "compare", tmp_path / "nope"), "no such run directory")
    assert_error(cli(capsys, "compare", tmp_path), "not a run directory")


def test_compare_a_run_with_itself_and_a_run_without_rows(capsys, finished_run, tmp_path):
    """The same run twice repeated every column; a run stopped before its first row was called 'not a
    run directory' (issue 21)."""
    assert_error(cli(capsys, "compare", finished_run, finished_run / "."), "is the same run as", "give each run once")
    started = tmp_path / "started"
    started.mkdir()
    shutil.copy(finished_run / "config.yaml", started / "config.yaml")
    assert_error(cli(capsys, "compare", started), "holds no rows yet", "rerun it")


def test_empty_rows_jsonl_without_results_csv(capsys, finished_run):
    (finished_run / "results.csv").unlink()
    (finished_run / "rows.jsonl").write_text("")
    assert_error(cli(capsys, "recommend", finished_run), "rows.jsonl holds no rows yet")


def test_recommend_with_damaged_census_still_recommends(capsys, finished_run):
    (finished_run / "census.json").write_text('{"layers": [')
    res = cli(capsys, "recommend", finished_run)
    assert res.rc == 0 and "->" in res.out, res.err


def test_recommend_with_damaged_config_names_line_and_column(capsys, finished_run):
    (finished_run / "config.yaml").write_text("model: x\nrecipes: [fp\n")
    assert_error(cli(capsys, "recommend", finished_run), "config.yaml is not valid YAML", "line 3")


def test_compare_with_damaged_manifest_says_so(capsys, finished_run):
    (finished_run / "manifest.json").write_text('{"model": ')
    res = cli(capsys, "compare", finished_run)
    assert res.rc == 0 and "no readable manifest.json" in res.out


def test_compare_csv_below_a_file(capsys, finished_run, tmp_path):
    (tmp_path / "f").write_text("x")
    assert_error(cli(capsys, "compare", finished_run, "--csv", tmp_path / "f" / "t.csv"), "t.csv", "Errno 20")


def test_failed_compare_and_recommend_change_nothing(capsys, finished_run):
    before = rows_lines(finished_run)
    recipes = results_recipes(finished_run)
    shutil.copy(finished_run / "results.csv", finished_run / "backup.csv")
    (finished_run / "results.csv").write_text("recipe,ppl\nfp,1\nw8a8-token")
    assert_error(cli(capsys, "compare", finished_run), "truncated")
    assert rows_lines(finished_run) == before
    shutil.copy(finished_run / "backup.csv", finished_run / "results.csv")
    assert results_recipes(finished_run) == recipes
