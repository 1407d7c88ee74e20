"""The coverage matrix (issue 15, issue 9 §3): every listed family x census, W8A8/W4A16 recipes and
every mitigation, on tiny random models. Function preservation is checked against each family's own
full-precision logits; docs/architectures.md and the README's family list must equal a fresh run."""
from __future__ import annotations

from pathlib import Path

import pytest

from quantbench.testing.coverage import COLUMNS, RECIPES, run_matrix
from quantbench.testing.coverage_doc import README_BEGIN, README_END, readme_section, render

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi", "phi3", "gpt2",
            "gpt_neox", "opt", "falcon", "olmo2", "granite", "mixtral", "qwen2_moe")
LAYERNORM = {"phi", "gpt2", "gpt_neox", "opt", "falcon", "starcoder2", "cohere"}  # rotation cannot be exact: mean subtraction, bias
SANDWICH = {"gemma2", "gemma3_text", "olmo2"}  # residual written through weighted post-norms


@pytest.fixture(scope="module")
def matrix():
    m = run_matrix()  # every family of quantbench.testing.families (the required ones and more)
    assert set(REQUIRED) <= set(m.cells)
    return m


def test_no_cell_fails_silently(matrix):
    """Every cell of every family: ✓, or a one-line refusal naming the family."""
    assert matrix.failures() == []
    for fam, row in matrix.cells.items():
        for col, cell in row.items():
            assert cell.status in ("ok", "refused"), (fam, col)
            if cell.status == "refused":
                assert fam in cell.text and "\n" not in cell.text, (fam, col, cell.text)


def test_every_family_passes_census_recipes_and_the_scaling_mitigations(matrix):
    core = ("census", *RECIPES, "smoothquant", "gptq", "awq", "clip", "int8_decomp", "outlier_tokens")
    for fam in matrix.cells:
        assert all(matrix.cells[fam][c].status == "ok" for c in core), fam


def test_rotation_runs_exactly_where_it_can_and_refuses_with_the_reason_elsewhere(matrix):
    for fam in matrix.cells:
        cell = matrix.cells[fam]["rotate"]
        if fam in LAYERNORM:
            assert cell.status == "refused" and "LayerNorm" in cell.text
        elif fam in SANDWICH:
            assert cell.status == "refused" and "post_attention_layernorm" in cell.text
        else:
            assert cell.status == "ok", (fam, cell.text)
    assert sum(matrix.cells[f]["rotate"].status == "ok" for f in REQUIRED) >= 9


def test_docs_and_readme_are_generated_from_this_run(matrix):
    doc = (ROOT / "docs" / "architectures.md").read_text()
    assert doc == render(matrix), "docs/architectures.md is stale: run python tools/architectures.py"
    readme = (ROOT / "README.md").read_text()
    section = README_BEGIN + readme.split(README_BEGIN, 1)[1].split(README_END, 1)[0] + README_END
    assert section == readme_section(matrix), "README's family list is stale: run python tools/architectures.py"
    assert all(c in doc for c in COLUMNS)
