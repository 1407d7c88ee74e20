"""The committed small reference (results/reference/small, configs/reference-small.yaml) is recomputed
from the current code and must equal the committed rows bit for bit, so code and committed numbers
cannot drift apart silently. After a change that moves numbers on purpose, refresh it from a clean tree:
`quantbench run --config configs/reference-small.yaml --out results/reference --run-id small`.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from reliability_common import cli

REPO = Path(__file__).resolve().parents[1]
COMMITTED = REPO / "results" / "reference" / "small"
# what a rerun may change: time, memory, and the key that names the code and packages that computed it
NOT_COMPARED = {"eval_tok_s", "calib_s", "wall_s", "peak_mem_mb", "tasks_s", "inputs_key"}


def _rows(run: Path) -> dict[str, dict]:
    return {r["recipe"]: r for r in map(json.loads, (run / "rows.jsonl").read_text().splitlines())}


@pytest.mark.integration
def test_small_reference_is_reproduced_bit_for_bit(capsys, tmp_path):
    res = cli(capsys, "run", "--config", REPO / "configs" / "reference-small.yaml", "--out", tmp_path,
              "--run-id", "small")
    assert res.rc == 0, res.err[-2000:]
    new, old = _rows(tmp_path / "small"), _rows(COMMITTED)
    assert list(new) == list(old) == ["fp", "w8a8-token", "w4a16-g64"]
    for recipe, row in old.items():
        keys = set(row) - NOT_COMPARED
        assert keys == set(new[recipe]) - NOT_COMPARED, recipe
        differ = sorted(k for k in keys if new[recipe][k] != row[k])
        assert not differ, (recipe, {k: (row[k], new[recipe][k]) for k in differ[:5]})
    assert new["w4a16-g64"]["ppl"] > new["fp"]["ppl"]
