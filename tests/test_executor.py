"""Executors: a local Ray with two CPU workers gives the serial executor's rows exactly; a worker
killed mid-task is retried, or its row stays missing and a rerun computes only it; bad executor
settings are one line."""
import json
import os
import subprocess
import sys

import pytest
import ray  # a declared dependency: imported, never skipped
from conftest import save_tiny_llama

from quantbench.core.errors import QuantbenchError
from quantbench.core.fileio import read_rows
from quantbench.run import pipeline
from quantbench.run.config import parse_config

RECIPES = ["fp", "w8a8-tensor-static-sq", "w8a8-tensor-static", "w4a16-g64"]
# measured costs (seconds, throughput, process memory, cache reuse) differ between any two runs and
# processes; every other column must be identical
COSTS = {"calib_stats_reused", "peak_mem_mb"}  # and every column in seconds (`*_s`, e.g. smoothquant_s)


def _cost(column: str) -> bool:
    return column in COSTS or column.endswith("_s")





@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny"), 0)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    p = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    words = "the model reads a sentence . then another one , and a number 42 follows \n".split(" ")
    p.write_text("\n\n".join(" ".join(words[(i + j) % len(words)] for j in range(60)) for i in range(80)))
    return p


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


def _cfg(model, corpus, out, run_id="t", executor="serial", **ex):
    return parse_config({
        "model": str(model), "output_dir": str(out), "run_id": run_id, "threads": 1,
        "corpus": {"name": str(corpus), "calib_samples": 2, "calib_seq_len": 32},
        "eval": {"seq_len": 64, "max_windows": 3, "batch_size": 2},
        "census": {"samples": 2, "seq_len": 32, "plots": False}, "recipes": RECIPES,
        "executor": {"kind": executor, **ex}})


def _rows(out):
    return {r["recipe"]: r for r in read_rows(out / "rows.jsonl")}


def _same_rows(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for name in a:
        ka, kb = {k for k in a[name] if not _cost(k)}, {k for k in b[name] if not _cost(k)}
        assert ka == kb, name
        for k in ka:  # exact: floats compared bit for bit (through their JSON text)
            assert json.dumps(a[name][k]) == json.dumps(b[name][k]), (name, k, a[name][k], b[name][k])


def test_ray_two_workers_equal_serial_rows_exactly(tiny_dir, corpus, tmp_path, local_ray):
    """Two checkpoints x four recipes: one run directory per checkpoint, the same rows either way."""
    other = save_tiny_llama(tmp_path / "other", 1)
    sweep = {"models": [str(tiny_dir), str(other)]}
    serial = pipeline.run(parse_config({**_dump(_cfg(tiny_dir, corpus, tmp_path / "s")), **sweep}))
    remote = pipeline.run(parse_config({**_dump(_cfg(tiny_dir, corpus, tmp_path / "r", executor="ray")), **sweep}))
    assert [o.name for o in remote] == [f"t-{pipeline._slug(str(tiny_dir))}", f"t-{pipeline._slug(str(other))}"]
    for s, r in zip(serial, remote):
        a, b = _rows(s), _rows(r)
        assert all(x["status"] == "ok" for x in b.values())
        _same_rows(a, b)
        # the plan records come back from the workers and are written by the driver
        assert sorted(p.name for p in (r / "plans").iterdir()) == sorted(p.name for p in (s / "plans").iterdir())
        assert (r / "results.md").exists() and (r / "census.json").exists()
    assert _rows(remote[0])["w4a16-g64"]["ppl"] != _rows(remote[1])["w4a16-g64"]["ppl"]  # really two checkpoints


def _dump(cfg):
    return cfg.model_dump(mode="json", exclude={"model"})


def _flaky(deaths: str, calls: str):
    """A worker function that kills its own worker process (as on a preempted node) on the first try
    of w8a8-tensor-static-sq and on every try of w4a16-g64 until the file `deaths` says it died twice there."""
    real = pipeline.worker_cell

    def cell(cfg_json, recipe, inputs):
        with open(calls, "a") as f:
            f.write(recipe + "\n")
        died = open(deaths).read().split() if os.path.exists(deaths) else []
        if (recipe == "w8a8-tensor-static-sq" and recipe not in died) or (recipe == "w4a16-g64" and died.count(recipe) < 2):
            with open(deaths, "a") as f:
                f.write(recipe + "\n")
            os._exit(1)
        return real(cfg_json, recipe, inputs)

    return cell


def test_killed_workers_retry_then_lose_the_cell_and_a_rerun_computes_only_it(
        tiny_dir, corpus, tmp_path, local_ray, monkeypatch):
    calls, deaths = tmp_path / "calls", tmp_path / "deaths"
    monkeypatch.setattr(pipeline, "worker_cell", _flaky(str(deaths), str(calls)))
    cfg = _cfg(tiny_dir, corpus, tmp_path / "o", executor="ray", max_retries=1)
    with pytest.raises(QuantbenchError, match="1 cell\\(s\\) lost.*w4a16-g64.*rerun the same command"):
        pipeline.run(cfg)
    out = tmp_path / "o" / "t"
    assert sorted(deaths.read_text().split()) == ["w4a16-g64", "w4a16-g64", "w8a8-tensor-static-sq"]
    assert set(_rows(out)) == set(RECIPES) - {"w4a16-g64"}  # w8a8-tensor-static-sq was retried once and finished
    assert (out / "results.md").exists()
    calls.write_text("")
    pipeline.run(cfg)
    assert calls.read_text().split() == ["w4a16-g64"]
    assert set(_rows(out)) == set(RECIPES)


def _cli(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", "from quantbench.cli import main; main()", "run", *args],
                          capture_output=True, text=True, env=env, timeout=120)


def test_an_unreachable_cluster_is_one_line_before_any_work(tmp_path):
    res = _cli("--executor", "ray", "--ray-address", "127.0.0.1:1", "--out", str(tmp_path))
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "error: executor ray: cannot reach the Ray cluster at 127.0.0.1:1" in res.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("executor, says", [
    ({"kind": "spark"}, "config: executor.kind: Input should be 'serial' or 'ray'"),
    ({"kind": "ray", "address": "nowhere"}, "executor ray: address 'nowhere' is not 'auto', 'host:port'"),
    ({"kind": "ray", "num_gpus": -1}, "config: executor.num_gpus: Input should be greater than or equal to 0"),
])
def test_bad_executor_settings_are_one_line(executor, says, tmp_path):
    with pytest.raises(QuantbenchError) as e:
        pipeline.run(parse_config({"output_dir": str(tmp_path), "executor": executor}))
    assert str(e.value).startswith(says) and "\n" not in str(e.value)


@pytest.mark.parametrize("ask, says", [({"num_cpus": 4}, "asks for 4 CPU, but no node of the cluster has more than 2"),
                                       ({"num_gpus": 1}, "asks for 1 GPU, but no node of the cluster has more than 0")])
def test_cells_no_node_can_hold_are_refused_before_any_work(tiny_dir, corpus, tmp_path, local_ray, ask, says):
    """They waited forever (issue 21)."""
    with pytest.raises(QuantbenchError, match=says):
        pipeline.run(_cfg(tiny_dir, corpus, tmp_path / "o", executor="ray", **ask))
    assert not (tmp_path / "o" / "t" / "rows.jsonl").exists()


def test_models_and_model_together_are_refused():
    with pytest.raises(QuantbenchError, match="config: <root>: set either `model` or `models`, not both"):
        parse_config({"model": "a", "models": ["b", "c"]})

