"""The retrofit's outlier-penalty variant (`<variant>+penalty`, issue 25) on tiny random Llama models:
the penalty against its formula written out in numpy, on hidden states read independently through
Hugging Face's output_hidden_states; its gradient reaches the decoder weights (only those before the
penalised layers); training on it lowers it against the control on the same batches while the logged
curve stays the cross-entropy; bad settings are one-line errors; a resumed run reproduces the
uninterrupted one; the command runs end to end with a `+` in the variant's folders."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import save_tiny_llama, tiny_model
from test_retrofit import TINY, _cfg, interrupt_each_once

from quantbench.train.loop import _loss
from quantbench.train.retrofit.config import PenaltyConfig
from quantbench.train.retrofit.loop import loss_and_penalty, outlier_penalty

D = 576  # the default model's hidden size: the documented ≈ 288 for a 2-of-576 outlier


def _np_token_kurtosis(h: np.ndarray) -> np.ndarray:
    """Per token: E_D[(h - mu)^4] / (E_D[(h - mu)^2])^2, float64."""
    c = h - h.mean(axis=-1, keepdims=True)
    return (c ** 4).mean(axis=-1) / ((c ** 2).mean(axis=-1) ** 2)


def _np_kurtosis(h: np.ndarray) -> float:
    """Mean over tokens of the per-token kurtosis."""
    return float(_np_token_kurtosis(h).mean())


def _np_max(h: np.ndarray) -> float:
    """max |h| / sqrt(mean h^2) over the whole tensor, float64."""
    return float(np.abs(h).max() / np.sqrt((h ** 2).mean()))


def _planted(seed: int) -> np.ndarray:
    """[2, 8, D] Gaussian hidden states; the first token of each sequence carries 1000 in dims 507 and 247."""
    h = np.random.default_rng(seed).standard_normal((2, 8, D))
    h[:, 0, [507, 247]] = 1000.0
    return h


def test_penalty_equals_the_formula_on_planted_outliers():
    layers = [_planted(0), _planted(1), np.random.default_rng(2).standard_normal((2, 8, D))]
    ts = [torch.tensor(h, dtype=torch.float32) for h in layers]
    for kind, ref in (("kurtosis", _np_kurtosis), ("max", _np_max)):
        for pick in ([0, 1, 2], [0, 2], [2]):  # the mean over the chosen layers
            want = float(np.mean([ref(layers[i]) for i in pick]))
            got = outlier_penalty([ts[i] for i in pick], kind).item()
            assert got == pytest.approx(want, rel=1e-5), (kind, pick)
    # the documented scale: ~288 for the outlier token, ~3 for Gaussian tokens
    k = _np_token_kurtosis(layers[0])
    assert 280 < k[:, 0].min() and k[:, 0].max() < 290
    assert 2.5 < k[:, 1:].min() and k[:, 1:].max() < 3.5
    assert _np_max(layers[0]) == pytest.approx((2 * 8 * D / 4) ** 0.5, rel=0.01)  # 1000 / RMS: 4 outliers in 2·8·576
    assert 3 < _np_max(layers[2]) < 5


def _no_final_norm(model: nn.Module) -> nn.Module:
    """A copy whose final norm is the identity: its output_hidden_states[-1] is the last layer's raw output."""
    m = copy.deepcopy(model)
    m.model.norm = nn.Identity()
    return m


@pytest.mark.parametrize("kind", ["kurtosis", "max"])
@pytest.mark.parametrize("layers", ["all", (0, 2), (2,)])
def test_penalty_reads_the_decoder_layer_outputs(kind, layers):
    """loss_and_penalty on a 3-layer model against numpy on HF's hidden_states[i + 1] (final norm removed,
    so the last entry is the residual, not the normed output); the cross-entropy is `_loss`, unchanged."""
    model = tiny_model("llama", layers=3, attn_implementation="sdpa")
    ids = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(4))
    p = PenaltyConfig(kind=kind, weight=1.0, layers=layers)
    pick = [0, 1, 2] if layers == "all" else list(layers)
    with torch.no_grad():
        hs = _no_final_norm(model)(input_ids=ids, output_hidden_states=True).hidden_states  # 1 + 3 entries
        ce, pen = loss_and_penalty(model, ids, p, pick, train_on_it=False)
        assert torch.equal(ce, _loss(model, ids))
    ref = _np_kurtosis if kind == "kurtosis" else _np_max
    want = float(np.mean([ref(hs[i + 1].double().numpy()) for i in pick]))
    assert pen.item() == pytest.approx(want, rel=1e-5)
    if 2 in pick:  # the last layer: the residual, not HF's normed hidden_states[-1]
        with torch.no_grad():
            normed = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        assert not torch.allclose(normed, hs[-1])


def test_penalty_gradient_reaches_the_decoder_weights():
    """Trained on: the penalty alone gives gradients to the weights of the penalised layer and those
    before it, none to later layers or the lm_head. Only logged: the penalty carries no gradient."""
    model = tiny_model("llama", layers=3, attn_implementation="sdpa").train()
    ids = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(5))
    _, pen = loss_and_penalty(model, ids, PenaltyConfig(layers=(1,)), [1], train_on_it=True)
    pen.backward()
    g = {n: p.grad for n, p in model.named_parameters()}
    for i in (0, 1):
        for m in ("mlp.down_proj", "self_attn.q_proj", "self_attn.o_proj"):
            assert g[f"model.layers.{i}.{m}.weight"].abs().sum() > 0, (i, m)
    assert g["model.embed_tokens.weight"].abs().sum() > 0
    assert all(g[n] is None for n in g if n.startswith(("model.layers.2.", "lm_head", "model.norm")))
    _, logged = loss_and_penalty(model, ids, PenaltyConfig(), [0, 1, 2], train_on_it=False)
    assert not logged.requires_grad


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return str(save_tiny_llama(tmp_path_factory.mktemp("base")))


@pytest.mark.parametrize("kind", ["kurtosis", "max"])
def test_training_on_the_penalty_lowers_it_against_the_control(tmp_path, tiny_llama, kind):
    """Same model, batches and seed: step 1 is identical (same cross-entropy and penalty; the logged
    curve is the cross-entropy alone), and after each update the penalised run's penalty is lower on
    the same batch. Measured (kurtosis): 2.93 at step 1, then 2.84/2.75/2.71 vs the control's 2.98/2.92/2.94."""
    from quantbench.train.retrofit.run import train_variants

    cfg = _cfg(tmp_path, tiny_llama, variants=["control", "control+penalty"], penalty={"kind": kind, "weight": 1.0})
    logs = train_variants(cfg)
    c, p = logs["control"], logs["control+penalty"]
    assert [r[0] for r in p.penalty] == [1, 2, 3, 4]
    assert p.penalty[0] == c.penalty[0] and p.train[0] == c.train[0]
    for (step, pc), (_, pp) in zip(c.penalty[1:], p.penalty[1:]):
        assert pp < pc, (step, pp, pc)
    saved = json.loads((cfg.run_dir() / "control+penalty" / "log.json").read_text())
    assert saved["penalty"] == p.penalty and saved["train"] == p.train


def test_resume_reproduces_the_uninterrupted_penalised_run(tmp_path, tiny_llama):
    from quantbench.train.retrofit.run import train_variants

    variants = ["control+penalty", "kv_bias+penalty"]
    over = {"variants": variants, "penalty": {"kind": "max", "weight": 0.5, "layers": [1]}}
    whole = train_variants(_cfg(tmp_path / "a", tiny_llama, **over))
    cfg = _cfg(tmp_path / "b", tiny_llama, **over)
    interrupt_each_once(cfg, variants, lambda v: [r[0] for r in json.loads(
        (cfg.run_dir() / v / "checkpoint" / "log.json").read_text())["penalty"]] == [1, 2])
    for v in variants:
        log = json.loads((cfg.run_dir() / v / "log.json").read_text())
        assert log["penalty"] == whole[v].penalty and len(log["penalty"]) == 4, v
        assert log["train"] == whole[v].train and log["heldout"] == whole[v].heldout, v
    final = json.loads((cfg.run_dir() / "kv_bias+penalty" / "final" / "config.json").read_text())
    assert final["graft"] == "kv_bias"  # the suffix is not part of the graft


@pytest.mark.parametrize("body,msg", [
    ("penalty:\n  kind: kurt\n", "penalty.kind"),
    ("penalty:\n  weight: 0\n", "penalty.weight"),
    ("penalty:\n  weight: -1.0\n", "penalty.weight"),
    ("penalty:\n  layers: [0, -1]\n", "penalty.layers"),
    ("penalty:\n  layers: [1, 1]\n", "penalty.layers"),
    ("penalty:\n  layers: []\n", "penalty.layers"),
    ("penalty:\n  wieght: 1\n", "penalty.wieght: unknown key"),
    ("variants: [control, kv_bais+penalty]\n", "did you mean 'kv_bias'"),
    ("variants: [control, control+penalty+penalty]\n", "control+penalty"),
])
def test_penalty_config_mistakes_are_one_line(tmp_path, capsys, body, msg):
    from reliability_common import assert_error, cli

    p = tmp_path / "bad.yaml"
    p.write_text("experiment: retrofit\n" + body)
    assert_error(cli(capsys, "train", "--config", p), msg)


def test_penalty_layer_beyond_the_model_is_one_line(tmp_path, capsys, tiny_llama):
    import yaml
    from reliability_common import assert_error, cli

    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump({**TINY, "model": tiny_llama, "variants": ["control+penalty"],
                                 "penalty": {"layers": [0, 2]}}))
    assert_error(cli(capsys, "train", "--config", p, "--out", tmp_path / "out", "--run-id", "r"),
                 "penalty.layers [0, 2]", "0..1")
    assert not (tmp_path / "out" / "r" / "control+penalty").exists()  # refused before any variant starts


def test_default_penalty_block_keeps_the_run_directory():
    """A config that writes the default penalty block has the run directory of one without it (configs
    from before the penalty keep theirs); a changed penalty, and only that, gives a new one."""
    from quantbench.train.retrofit.config import parse_retrofit_config

    base = {"experiment": "retrofit", "seed": 3}
    fp = parse_retrofit_config(base).fingerprint()
    default = {"kind": "kurtosis", "weight": 0.1, "layers": "all"}
    assert parse_retrofit_config({**base, "penalty": default}).fingerprint() == fp
    assert parse_retrofit_config({**base, "variants": ["control", "control+penalty"]}).fingerprint() == fp
    for change in ({"weight": 0.2}, {"kind": "max"}, {"layers": [3]}):
        assert parse_retrofit_config({**base, "penalty": {**default, **change}}).fingerprint() != fp, change


def test_the_command_end_to_end_with_a_penalised_variant(tmp_path, tiny_llama):
    """`quantbench train` with control and control+penalty: folders, sweep rows and report keep the `+`."""
    import yaml
    from typer.testing import CliRunner

    from quantbench.cli import app

    cfg = {**TINY, "model": tiny_llama, "variants": ["control", "control+penalty"],
           "optim": {**TINY["optim"], "steps": 2, "ckpt_every": 1},
           "sweep": {"recipes": ["fp", "w8a8-tensor-static"], "eval_seq_len": 32, "eval_windows": 2,
                     "calib_samples": 2, "batch_size": 4}}
    path = tmp_path / "retrofit.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = CliRunner().invoke(app, ["train", "--config", str(path), "--out", str(tmp_path / "out"), "--run-id", "r"])
    assert res.exit_code == 0, res.output
    out = tmp_path / "out" / "r"
    rep = json.loads((out / "retrofit.json").read_text())
    assert [s["variant"] for s in rep["variants"]] == ["control", "control+penalty"]
    assert rep["penalty"] == {"kind": "kurtosis", "weight": 0.1, "layers": "all"}
    pen = {s["variant"]: s["penalty"] for s in rep["variants"]}
    assert pen["control"]["trained"] is False and pen["control+penalty"]["trained"] is True
    logs = {v: json.loads((out / v / "log.json").read_text()) for v in ("control", "control+penalty")}
    for v, s in pen.items():
        assert s["first"] == logs[v]["penalty"][0][1]
        assert s["last"] == pytest.approx(np.mean([r[1] for r in logs[v]["penalty"]]))
    rows = [json.loads(x) for x in (out / "sweep" / "control+penalty" / "rows.jsonl").open()]
    assert {r["recipe"] for r in rows} == {"fp", "w8a8-tensor-static"}
    md = (out / "retrofit.md").read_text()
    assert "| control+penalty |" in md and f"{pen['control+penalty']['first']:.4g} → " in md
    assert "0.1 × kurtosis penalty" in md
    assert (out / "penalty_curves.png").stat().st_size > 1000
