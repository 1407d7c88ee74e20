"""Every supported family through the path users take: a checkpoint written with save_pretrained
(+ tokenizer), run by `quantbench run --model <folder>` (census, a W8A8 and a W4 recipe, SmoothQuant).

The coverage matrix (tests/test_architectures.py) builds its models in-process with eager attention;
this test loads them as a user's folder, so the attention implementation is transformers' own choice
for the architecture (Gemma-2 has no sdpa) and is recorded in the manifest.
"""
from __future__ import annotations

import json

import pytest
from reliability_common import cli, corpus_text, word_tokenizer, write_config

from quantbench.testing.families import FAMILIES, tiny_family

RECIPES = ["fp", "w8a8-token", "w4a16-g64", "w8a8-tensor-static-sq"]


@pytest.fixture(scope="module")
def family_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    tok = word_tokenizer()
    out = {}
    for kind in FAMILIES:
        folder = root / kind
        model = tiny_family(kind)
        model.config._attn_implementation = None  # what a checkpoint on disk carries: no choice made
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        out[kind] = folder
    return out


def test_every_family_runs_from_a_saved_folder(family_folders, tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(corpus_text(60))
    cfg = write_config(tmp_path, "unused", corpus, recipes=RECIPES,
                       census={"enabled": True, "samples": 1, "seq_len": 16, "plots": False})
    argv = ["run", "-c", cfg]
    for folder in family_folders.values():
        argv += ["--model", str(folder)]
    res = cli(capsys, *argv)
    assert res.rc == 0, res.err[-3000:]
    manifests = {json.loads(p.read_text())["model"]["spec"]: json.loads(p.read_text())
                 for p in (tmp_path / "out").glob("*/manifest.json")}
    assert set(manifests) == {str(f) for f in family_folders.values()}
    for kind, folder in family_folders.items():
        m = manifests[str(folder)]
        run = next(p.parent for p in (tmp_path / "out").glob("*/manifest.json")
                   if json.loads(p.read_text())["model"]["spec"] == str(folder))
        rows = {r["recipe"]: r for r in map(json.loads, (run / "rows.jsonl").read_text().splitlines())}
        assert set(rows) == set(RECIPES), (kind, sorted(rows))
        assert all(r.get("ppl") and r["ppl"] == r["ppl"] for r in rows.values()), kind  # finite, not NaN
        assert (run / "census.json").exists(), kind
        expected = "eager" if kind == "gemma2" else m["model"]["attn_implementation"]
        assert m["model"]["attn_implementation"] == expected in ("sdpa", "eager"), kind


def test_an_unsupported_attention_implementation_is_named_as_such(family_folders):
    from quantbench.core.errors import QuantbenchError
    from quantbench.modeling.load import load_model

    with pytest.raises(QuantbenchError) as e:
        load_model(str(family_folders["gemma2"]), "cpu", attn_implementation="sdpa")
    msg = str(e.value)
    assert "does not support attn_implementation='sdpa'" in msg and "damaged" not in msg and "\n" not in msg
