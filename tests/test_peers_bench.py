"""benchmarks/peers.py without running a peer: its pairs resolve, its arguments parse, its table says what
happened to each side, and a peer failure becomes one line in the result (the full run is a benchmark)."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from quantbench.eval.lm import LMEval, Units
from quantbench.quant.recipes import resolve_recipe

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("peers_bench", ROOT / "benchmarks" / "peers.py")
peers = importlib.util.module_from_spec(_spec)
sys.modules["peers_bench"] = peers  # dataclasses look their module up
_spec.loader.exec_module(peers)


def test_pairs_resolve_and_name_their_mitigations():
    assert len(set(peers.PAIR_NAMES)) == len(peers.PAIRS) and set(peers.QUICK_PAIRS) <= set(peers.PAIR_NAMES)
    for p in peers.PAIRS:
        recipe = resolve_recipe(p.quantbench)
        assert p.peer in ("llmcompressor", "torchao") and p.differs
        # calib_samples is set only on mitigations the recipe has (a typo would silently keep the preset's 8)
        assert set(p.calib_options) <= {m.name for m in recipe.mitigations}, p.name
    awq = resolve_recipe(next(p for p in peers.PAIRS if p.name == "llmc-w4a16-g64-asym-awq").quantbench)
    assert awq.weights.symmetric is False and awq.weights.group_size == 64  # W4A16_ASYM at group 64, as the peer


def test_arguments(tmp_path):
    a = peers.parse_args(["--quick"])
    assert a.quick and a.out.endswith("peers-quick") and a.torch_spec.startswith("torch==")
    assert peers.parse_args(["--pairs", "all", "--out", str(tmp_path / "x")]).pairs == ["all"]
    with pytest.raises(SystemExit):
        peers.parse_args(["--pairs", "llmc-nonsense"])


def _lm(nll, kl):
    u = Units(block=2, nll=list(nll), tokens=[2] * len(nll), kl=list(kl), top1=[2] * len(nll))
    return LMEval(ppl=2.0, nll=0.5, n_tokens=2 * len(nll), kl=sum(kl) / (2 * len(nll)), top1=1.0, seconds=1.0,
                  tok_per_s=1.0, units=u)


def test_rows_and_table_on_a_fake_result(capsys):
    fp = _lm([1.0, 1.0, 1.0], [0.0, 0.0, 0.0])
    qb = peers.Side("w8a8-token", calib_s=3.0, peak_mb=100.0, lm=_lm([1.1, 1.2, 1.0], [0.1, 0.2, 0.1]))
    failed = peers.Side("int4-weight-only-g64", status="failed: ImportError: Requires mslk >= 1.0.0")
    row_q = qb.row(fp)
    assert row_q["dppl_pct"]["lo"] <= row_q["dppl_pct"]["estimate"] <= row_q["dppl_pct"]["hi"]
    assert row_q["dppl_pct"]["estimate"] == pytest.approx(100 * (2.718281828 ** (0.3 / 6) - 1), abs=0.01)
    assert row_q["kl"]["estimate"] == pytest.approx(0.4 / 6, abs=1e-4)
    result = {"rows": [{"pair": "torchao-w4a16-g64", "peer": "torchao", "differs": "x", "peer_side": failed.row(fp),
                        "quantbench_side": row_q, "peer_vs_quantbench_ppl_pct": peers.compare(failed, qb)}]}
    lines = peers.table(result).splitlines()
    assert len(lines) == 4 and lines[1].count("---") == lines[0].count("|") - 1
    peer_cells = [c.strip() for c in lines[2].split("|")[1:-1]]
    assert peer_cells[1] == "peer: torchao" and peer_cells[-1].startswith("failed: ImportError")
    assert all(c == "" for c in peer_cells[3:10])  # a side that did not run has no numbers
    assert "| 3.0 | 100 |" in lines[3] and lines[3].rstrip().endswith("| ok |")
    same = peers.Side("w8a8", lm=qb.lm)  # e.g. llm-compressor's round-to-nearest: the same codes as ours
    assert peers.compare(same, qb)["identical"] and not peers.compare(fp_side := peers.Side("fp", lm=fp), qb)["identical"]
    assert peers.compare(fp_side, qb)["estimate"] < 0  # FP's perplexity is below the quantized one's
    result["rows"][0].update(peer_side=same.row(fp), peer_vs_quantbench_ppl_pct=peers.compare(same, qb))
    assert "| identical |" in peers.table(result)
    peers._progress("torchao", failed, 0.0)
    peers._progress("quantbench", qb, 0.0)
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("failed: ImportError: Requires mslk >= 1.0.0; ") and "ppl 2.000, KL 0.0667" in out[1]


def test_peer_child_failure_is_one_line(tmp_path):
    """Without llm-compressor (this venv) or the work files the child records the reason, not a traceback."""
    import argparse

    peers.peer_child(argparse.Namespace(peer_child="w8a8", work=str(tmp_path), threads=1))
    res = json.loads((tmp_path / "w8a8" / "result.json").read_text())
    assert set(res) == {"recipe", "error"} and "\n" not in res["error"] and len(res["error"]) <= 200


def test_finished_pairs_resume_under_the_same_protocol_only(tmp_path):
    out = str(tmp_path / "peers")
    proto = {"config": "c.yaml", "model": "m", "model_fingerprint": "f", "corpus": "wiki", "calibration": "16 x 256",
             "windows": {"n": 8}, "dtype": "float32", "device": "cpu", "quick": False, "threads": 2}
    peers.save_row(out, proto, {"pair": "llmc-w8a8", "x": 1})
    peers.save_row(out, {**proto, "model_fingerprint": "other"}, {"pair": "torchao-w8a8", "x": 2})
    with peers.rows_path(out).open("a") as f:
        f.write('{"protocol": {"config": "c.yaml"')  # a line cut by the interruption
    assert peers.load_rows(out, {**proto, "threads": 16}) == {"llmc-w8a8": {"pair": "llmc-w8a8", "x": 1}}
    assert peers.load_rows(str(tmp_path / "none"), proto) == {}
