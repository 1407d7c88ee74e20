"""Measured tables in README.md and docs/ come from the committed reference runs (issue 9 §6).

`make results` reruns results/reference/<name>/ and `quantbench tables` rewrites each
`<!-- reference: NAME columns=... -->` block from its results.csv; here the committed docs must be
exactly what the committed runs give, and every block must name a committed run with a manifest.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from quantbench.report.reference import BLOCK, doc_files, render, sync

ROOT = Path(__file__).resolve().parents[1]
REF = ROOT / "results" / "reference"


def test_docs_tables_equal_the_committed_reference_runs():
    assert sync(doc_files(ROOT), REF, check=True) == [], "run `quantbench tables` after `make results`"


def test_every_block_names_a_committed_run_with_its_provenance():
    names = {m["name"] for f in doc_files(ROOT) for m in BLOCK.finditer(f.read_text())}
    assert {"default", "mitigations", "export"} <= names  # README's, docs/quantization.md's and README's export tables
    for name in names:
        run = REF / name
        manifest = json.loads((run / "manifest.json").read_text())
        assert manifest["quantbench_git"] and manifest["packages"], name
        csv = pd.read_csv(run / "results.csv")
        rows = [json.loads(line) for line in (run / "rows.jsonl").read_text().splitlines() if line.strip()]
        # the table's source is the run's own row store, not an edited CSV
        by_recipe = {r["recipe"]: r for r in rows}
        for _, r in csv.iterrows():
            if isinstance(r.get("ppl"), float) and r["ppl"] == r["ppl"]:
                assert abs(by_recipe[r["recipe"]]["ppl"] - r["ppl"]) <= 1e-9 * r["ppl"], (name, r["recipe"])


def test_gap_closed_is_the_formula(tmp_path):
    # gap closed = (ppl naive - ppl mitigated) / (ppl naive - ppl FP), written out here
    run = tmp_path / "r"
    run.mkdir()
    (run / "config.yaml").write_text(
        "recipes:\n"
        "- {name: fp}\n"
        "- {name: a, weights: {bits: 8}, activations: {bits: 8}}\n"
        "- {name: a-sq, weights: {bits: 8}, activations: {bits: 8}, mitigations: [{name: smoothquant}]}\n")
    pd.DataFrame([{"recipe": "fp", "mode": "fp", "ppl": 20.0},
                  {"recipe": "a", "mode": "simulated", "ppl": 60.0},
                  {"recipe": "a-sq", "mode": "simulated", "ppl": 30.0}]).to_csv(run / "results.csv", index=False)
    table = render(run, "recipe,ppl,gap")
    assert "| a-sq | 30.00 | 75 % |" in table.splitlines()  # (60 - 30) / (60 - 20)
