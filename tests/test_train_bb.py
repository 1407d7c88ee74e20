"""The Bigram-Backcopy data source of `quantbench train` (Guo et al. 2024): the generator follows the task's
rule (checked here independently of the generator), is a pure function of its seeds, reads back through
the word-level tokenizer and the sweep's corpus loader exactly, and config mistakes are one-line errors."""
from __future__ import annotations

import pytest
import torch

from quantbench.core.errors import ConfigError
from quantbench.train.config import parse_train_config
from quantbench.train.data import BigramBackcopy, _gen, bb_data, bb_text, bb_tokenizer, write_bb_corpus

V, K, S = 16, 3, 4

BB = {
    "seed": 0, "threads": 1, "variants": ["softmax"],
    "model": {"layers": 1, "hidden": 64, "heads": 4, "intermediate": 64, "context": 16},
    "data": {"source": "bigram_backcopy", "vocab": V, "triggers": K, "successors": S, "heldout_sequences": 8,
             "heldout_windows": 4},
    "optim": {"steps": 6, "batch_size": 4, "lr": 1e-2, "warmup": 1, "eval_every": 3, "ckpt_every": 3},
    "sweep": {"eval_seq_len": 16, "eval_windows": 4, "calib_samples": 2, "census_samples": 2, "batch_size": 4,
              "recipes": ["fp", "w8a8-tensor-static"]},
}


def bb_cfg(tmp_path, **over):
    data = {**BB["data"], **over.pop("data", {})}
    return parse_train_config({**BB, "data": data, "output_dir": str(tmp_path), "run_id": "bb", **over})


@pytest.fixture(scope="module")
def task() -> BigramBackcopy:
    return BigramBackcopy.build(V, K, S, seed=0)


def check_rule(ids: torch.Tensor, transition: torch.Tensor, triggers: set[int]) -> tuple[int, int]:
    """The task's rule, position by position, in plain Python: BOS (= V) first and only there; the first
    token is not a trigger; after a trigger the token before it; otherwise a non-zero bigram transition.
    Returns (copies, bigram steps) checked."""
    copies = draws = 0
    p = transition.tolist()
    for row in ids.tolist():
        assert row[0] == V and V not in row[1:]
        assert row[1] not in triggers
        for t in range(1, len(row) - 1):
            if row[t] in triggers:
                assert row[t + 1] == row[t - 1], (row, t)
                copies += 1
            else:
                assert p[row[t]][row[t + 1]] > 0, (row, t)
                draws += 1
    return copies, draws


def test_chain_shape(task):
    p = task.transition
    assert p.shape == (V, V) and task.bos == V and len(task.triggers) == K
    assert (p.sum(1) - 1).abs().max() < 1e-12
    assert ((p > 0).sum(1) == S).all()  # every row: exactly `successors` next tokens
    pi = torch.full((V,), 1.0 / V, dtype=torch.float64)
    for _ in range(2000):
        pi = pi @ p
    assert set(task.triggers) == set(pi.argsort(descending=True)[:K].tolist())  # the most frequent tokens


def test_generator_follows_the_rule(task):
    ids = task.sample(64, 40, _gen(3, 1))
    assert ids.shape == (64, 40) and ids.dtype == torch.long
    copies, draws = check_rule(ids, task.transition, set(task.triggers))
    assert copies > 50 and draws > 1000  # both cases really occur


def test_bigram_draws_follow_the_row(task):
    """Non-trigger steps are draws from the bigram row: empirical frequencies match it."""
    ids = task.sample(400, 64, _gen(5, 2))
    cur, nxt = ids[:, 1:-1].flatten(), ids[:, 2:].flatten()
    keep = ~task.trigger_mask(cur)
    counts = torch.zeros(V, V, dtype=torch.float64)
    counts.index_put_((cur[keep], nxt[keep]), torch.ones(int(keep.sum()), dtype=torch.float64), accumulate=True)
    busy = counts.sum(1) > 1000
    assert busy.sum() >= 4
    emp = counts[busy] / counts[busy].sum(1, keepdim=True)
    assert (emp - task.transition[busy]).abs().max() < 0.05
    assert (counts[task.transition == 0] == 0).all()  # never a zero-probability transition


def test_oracle_nll(task):
    ids = task.sample(16, 32, _gen(0, 9))
    nll = task.oracle_nll(ids)
    assert nll.shape == (16, 31) and torch.isfinite(nll).all()
    copy = task.trigger_mask(ids[:, :-1])
    copy[:, 0] = False
    assert (nll[copy] == 0).all() and (nll[~copy][1:] > 0).all()


def test_deterministic_given_seeds(tmp_path):
    cfg = bb_cfg(tmp_path)
    a, b = bb_data(cfg.data, 16), bb_data(cfg.data, 16)
    assert torch.equal(a.task.transition, b.task.transition) and a.task.triggers == b.task.triggers
    assert torch.equal(a.heldout, b.heldout)
    late = a.batch(7, 4, 16, seed=0)  # a batch is a function of (seed, step), not of what was drawn before
    assert torch.equal(b.batch(3, 4, 16, seed=0), a.batch(3, 4, 16, seed=0))
    assert torch.equal(a.batch(7, 4, 16, seed=0), late)
    assert not torch.equal(a.batch(3, 4, 16, seed=0), a.batch(4, 4, 16, seed=0))
    assert not torch.equal(a.batch(3, 4, 16, seed=0), a.batch(3, 4, 16, seed=1))
    assert not torch.equal(a.heldout[:4], a.batch(0, 4, 16, seed=0))  # held out: another salt
    assert torch.equal(a.heldout_windows(3, 10), a.heldout[:3, :10])
    other = bb_data(bb_cfg(tmp_path, data={"task_seed": 1}).data, 16)
    assert not torch.equal(other.task.transition, a.task.transition)
    check_rule(a.batch(2, 8, 16, seed=0), a.task.transition, set(a.task.triggers))


def test_tokenizer_and_sweep_corpus_read_back_exactly(tmp_path, task):
    from quantbench.data.corpus import calibration_batches, eval_windows, load_corpus

    tok = bb_tokenizer(V)
    assert len(tok) == V + 1 and tok.bos_token_id == V and tok.eos_token_id == V
    ids = task.sample(5, 12, _gen(1, 1))
    back = tok(bb_text(ids, V), add_special_tokens=False)["input_ids"]
    assert back == ids[:, 1:].flatten().tolist()
    cfg = bb_cfg(tmp_path)
    data = bb_data(cfg.data, 16)
    path = write_bb_corpus(data, tmp_path / "bb_corpus.txt", eval_seq_len=12, context=16, seed=0)
    c = load_corpus(str(path))
    w = eval_windows(tok, c.eval_text, 12, 12, 4, bos=True)
    assert torch.equal(w.input_ids, data.heldout[:4, :12])  # the sweep's windows are the held-out sequences
    cal = calibration_batches(tok, c.calib_text, 3, 16, seed=0)
    assert cal.shape == (3, 16) and (cal[:, 0] == V).all() and (cal[:, 1:] < V).all()


@pytest.mark.parametrize("data, msg", [
    ({"source": "bigram_backcop"}, "data.source: Input should be 'corpus' or 'bigram_backcopy'"),
    ({"vocb": 64}, "data.vocb: unknown key"),
    ({"corpus": "wiki"}, "data: corpus is not used with source: bigram_backcopy"),
    ({"successors": 32}, "successors (32) must not exceed vocab (16)"),
    ({"triggers": 16}, "triggers (16) must be fewer than vocab (16)"),
    ({"heldout_sequences": 4}, "data.heldout_sequences: Input should be greater than or equal to 8"),
])
def test_config_errors_are_one_line(tmp_path, data, msg):
    with pytest.raises(ConfigError) as e:
        bb_cfg(tmp_path, data=data)
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_bb_keys_refused_with_a_corpus(tmp_path):
    with pytest.raises(ConfigError) as e:
        parse_train_config({"data": {"corpus": "news", "triggers": 3}})
    assert "data: triggers is not used with source: corpus" in str(e.value) and "\n" not in str(e.value)


def test_sweep_must_fit_the_heldout_sequences(tmp_path):
    with pytest.raises(ConfigError) as e:
        bb_cfg(tmp_path, sweep={**BB["sweep"], "eval_windows": 9})
    assert "sweep.eval_windows (9) exceeds data.heldout_sequences (8)" in str(e.value)


def test_end_to_end_sweep_scores_the_heldout_sequences(tmp_path, monkeypatch):
    """Train one variant a few steps, census, sweep and probe: the sweep's FP perplexity is exp(held-out
    loss) (same sequences), the checkpoint's vocabulary is the task's, and the comparison has the probe.
    The PNG plots (half of this test's time) are skipped here; tests/test_train_run.py checks them."""
    import json
    import math

    import quantbench.report.html as report_html
    import quantbench.train.report as train_report
    from quantbench.modeling.load import load_model
    from quantbench.train.run import run_training

    monkeypatch.setattr(train_report, "plot_all", lambda *a, **k: [])
    monkeypatch.setattr(report_html, "_plots", lambda *a, **k: [])

    cfg = bb_cfg(tmp_path)
    out = run_training(cfg).parent
    log = json.loads((out / "softmax" / "log.json").read_text())
    rows = {json.loads(x)["recipe"]: json.loads(x) for x in (out / "sweep" / "softmax" / "rows.jsonl").open()}
    assert rows["fp"]["ppl"] == pytest.approx(math.exp(log["heldout"][-1][2]), rel=1e-4)
    assert rows["w8a8-tensor-static"]["status"] == "ok"
    lm = load_model(str(out / "softmax" / "final"), device="cpu")
    assert lm.model.config.vocab_size == V + 1 == len(lm.tokenizer) and lm.model.config.bos_token_id == V
    census = json.loads((out / "sweep" / "softmax" / "census.json").read_text())
    assert census["sequences"] == 2 and census["seq_len"] == 16
    probe = json.loads((out / "sweep" / "softmax" / "bb_probe.json").read_text())
    assert len(probe["layers"]) == 1 and probe["sequences"] == 8 and probe["triggers"] == list(bb_data(cfg.data, 16).task.triggers)
    comp = json.loads((out / "comparison.json").read_text())
    assert comp["variants"][0]["bb"]["loss"] == probe["loss"]
    md = (out / "comparison.md").read_text()
    assert "## Bigram-Backcopy probe" in md and f"{probe['layers'][0]['bos_attn_other']:.3f}" in md


def test_docs_outcome_table_is_the_committed_run():
    """docs/training.md's Bigram-Backcopy table is bb_outcome_table of the committed run's comparison.json."""
    import json
    import re
    from pathlib import Path

    from quantbench.train.report import bb_outcome_table

    root = Path(__file__).resolve().parents[1]
    comp = root / "results" / "reference" / "train-bb" / "comparison.json"
    if not comp.exists():
        pytest.skip("results/reference/train-bb is not in this checkout")
    doc = (root / "docs" / "training.md").read_text()
    m = re.search(r"<!-- train-bb:outcome -->\n(.*?)\n<!-- /train-bb:outcome -->", doc, re.S)
    assert m, "docs/training.md has no train-bb:outcome block"
    assert m.group(1) == bb_outcome_table(json.loads(comp.read_text()))
