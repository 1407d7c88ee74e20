"""`quantbench train` end to end on a tiny budget: training lowers the loss, the comparison holds the
run's numbers, checkpoints load through the normal model loader, an interrupted run resumes exactly."""
from __future__ import annotations

import csv
import json

import pytest
import torch

from quantbench.core.errors import ConfigError
from quantbench.train.config import parse_train_config

TINY = {
    "seed": 0, "threads": 1, "variants": ["softmax", "ca_scale"],
    "model": {"layers": 1, "hidden": 64, "heads": 4, "intermediate": 128, "context": 16},
    "data": {"corpus": "news", "heldout_tokens": 512, "heldout_windows": 4},
    "optim": {"steps": 12, "batch_size": 4, "lr": 1e-2, "warmup": 2, "eval_every": 4, "ckpt_every": 4},
    "sweep": {"eval_seq_len": 16, "eval_windows": 4, "calib_samples": 2, "census_samples": 2, "batch_size": 4,
              "recipes": ["fp", "w8a8-tensor-static", "w4a16-g64"]},
}


def tiny_cfg(out, **over):
    return parse_train_config({**TINY, "output_dir": str(out), "run_id": "t", **over})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from quantbench.train.run import run_training

    cfg = tiny_cfg(tmp_path_factory.mktemp("train"))
    return cfg, run_training(cfg).parent


def test_short_training_lowers_the_loss(trained):
    _, out = trained
    for v in ("softmax", "ca_scale"):
        log = json.loads((out / v / "log.json").read_text())
        assert [h[0] for h in log["heldout"]] == [4, 8, 12]
        assert log["heldout"][-1][2] < log["heldout"][0][2] - 0.3
        assert sum(r[2] for r in log["train"][-3:]) < sum(r[2] for r in log["train"][:3]) - 1.0


def test_comparison_holds_the_run_numbers(trained):
    _, out = trained
    comp = json.loads((out / "comparison.json").read_text())
    rows = {r["variant"]: r for r in csv.DictReader(open(out / "comparison.csv"))}
    md = (out / "comparison.md").read_text()
    assert [v["variant"] for v in comp["variants"]] == ["softmax", "ca_scale"]
    for s in comp["variants"]:
        v = s["variant"]
        log = json.loads((out / v / "log.json").read_text())
        census = json.loads((out / "sweep" / v / "census.json").read_text())
        sweep = {json.loads(line)["recipe"]: json.loads(line) for line in (out / "sweep" / v / "rows.jsonl").open()}
        assert s["final_heldout_loss"] == log["heldout"][-1][2]
        assert float(rows[v]["final_heldout_loss"]) == pytest.approx(log["heldout"][-1][2])
        assert s["census"]["max_ratio"] == census["summary"]["max_ratio"]
        assert [r["max_abs"] for r in s["census"]["layers"]] == [r["max_abs"] for r in census["layers"]]
        for r in ("w8a8-tensor-static", "w4a16-g64"):
            assert s["sweep"]["recipes"][r]["delta_ppl_pct"] == sweep[r]["delta_ppl_pct"]
            assert float(rows[v][f"dppl_pct_{r}"]) == pytest.approx(sweep[r]["delta_ppl_pct"])
            assert f"{sweep[r]['delta_ppl_pct']:+.2f}%" in md
        assert f"{log['heldout'][-1][2]:.3f}" in md and f"{census['summary']['max_ratio']:.1f}" in md
    ref = comp["variants"][0]["convergence"]
    assert ref and all(c["speedup"] == 1.0 for c in ref)  # the baseline reaches its own targets at ratio 1
    for png in ("loss_curves.png", "max_activation_by_layer.png", "delta_ppl.png"):
        assert (out / png).stat().st_size > 1000


def test_checkpoint_loads_through_the_model_loader(trained):
    from quantbench.modeling.arch import arch_of
    from quantbench.modeling.load import load_model

    _, out = trained
    lm = load_model(str(out / "ca_scale" / "final"), device="cpu")
    assert lm.info["model_type"] == "quantbench_lm" and lm.model.config.attention == "ca_scale"
    assert arch_of(lm.model).down == "mlp.down_proj"
    assert len(lm.tokenizer) == lm.model.config.vocab_size


class _Interrupt(Exception):
    pass


def test_resume_after_interruption_matches_uninterrupted_run(tmp_path):
    from quantbench.train.run import train_all

    over = {"variants": ["kv_bias"], "optim": {**TINY["optim"], "steps": 6, "ckpt_every": 2, "eval_every": 3},
            "sweep": {**TINY["sweep"], "enabled": False}}
    full = train_all(tiny_cfg(tmp_path / "a", **over))["kv_bias"]

    def stop(step: int) -> None:
        if step == 3:
            raise _Interrupt

    cfg = tiny_cfg(tmp_path / "b", **over)
    with pytest.raises(_Interrupt):
        train_all(cfg, on_step=stop)
    ck = cfg.run_dir() / "kv_bias" / "checkpoint"
    assert torch.load(ck / "trainer.pt")["step"] == 2 and not (cfg.run_dir() / "kv_bias" / "final").exists()
    resumed = train_all(cfg)["kv_bias"]  # same call again: resumes at step 2
    assert [r[2] for r in resumed.train] == pytest.approx([r[2] for r in full.train], abs=1e-5)
    assert [r[2] for r in resumed.heldout] == pytest.approx([r[2] for r in full.heldout], abs=1e-5)
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "a" / "t" / "kv_bias" / "final" / "model.safetensors"))
    b = load_file(str(cfg.run_dir() / "kv_bias" / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert not ck.exists()  # the finished run drops its resumable state


@pytest.mark.parametrize("over, msg", [
    ({"optim": {"stepz": 3}}, "optim.stepz: unknown key"),
    ({"variants": ["softmax", "sigmod"]}, "unknown attention variant 'sigmod' (did you mean 'sigmoid'?)"),
    ({"sweep": {"eval_seq_len": 32}}, "must not exceed model.context"),
    ({"model": {"hidden": 30, "heads": 4}}, "even head size"),
])
def test_config_errors_are_one_line(tmp_path, over, msg):
    with pytest.raises(ConfigError) as e:
        tiny_cfg(tmp_path, **over)
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_cli_has_train_command():
    from typer.testing import CliRunner

    from quantbench.cli import app

    res = CliRunner().invoke(app, ["train", "--help"])
    assert res.exit_code == 0 and "--config" in res.output and "--run-id" in res.output
