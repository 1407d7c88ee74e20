"""Corpora, evaluation windows and calibration batches."""
import pytest
import torch

from quantbench.core.errors import QuantbenchError
from quantbench.data.corpus import calibration_batches, eval_windows, load_corpus


class CharTok:
    """A character tokenizer: enough to test windowing exactly."""
    bos_token_id = 0
    eos_token_id = 1

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [2 + (ord(c) % 200) for c in text]}


TEXT = "".join(chr(97 + i % 26) for i in range(5000))


@pytest.mark.parametrize("bos", [True, False])
@pytest.mark.parametrize("stride", [64, 32])
def test_every_text_token_is_scored_once(bos, stride):
    w = eval_windows(CharTok(), TEXT, seq_len=64, stride=stride, max_windows=5, bos=bos)
    assert w.input_ids.shape == (5, 64)
    if bos:
        assert (w.input_ids[:, 0] == 0).all()
    body = 63 if bos else 64
    step = min(stride, body)
    # targets of window i are text tokens; reconstruct which text positions are scored
    scored = []
    for i in range(5):
        offset = i * step - (1 if bos else 0)  # text index of input position 0
        for pos in range(int(w.score_from[i]), 63):
            scored.append(offset + pos + 1)
    assert len(scored) == len(set(scored)) == w.protocol["scored_tokens"]
    assert min(scored) == (0 if bos else 1) and sorted(scored) == list(range(min(scored), max(scored) + 1))


def test_too_short_corpus_is_a_clear_error():
    with pytest.raises(QuantbenchError, match="too short"):
        eval_windows(CharTok(), "abc", seq_len=64, stride=64, max_windows=2, bos=True)
    with pytest.raises(QuantbenchError, match="calibration corpus too short"):
        calibration_batches(CharTok(), "abc", n=2, seq_len=64, seed=0)


def test_calibration_batches_are_seeded():
    a = calibration_batches(CharTok(), TEXT, n=4, seq_len=32, seed=1)
    b = calibration_batches(CharTok(), TEXT, n=4, seq_len=32, seed=1)
    c = calibration_batches(CharTok(), TEXT, n=4, seq_len=32, seed=2)
    assert a.shape == (4, 32) and torch.equal(a, b) and not torch.equal(a, c)


def test_local_file_corpus(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("\n\n".join(f"paragraph {i} " * 20 for i in range(10)))
    c = load_corpus(str(p))
    assert c.calib_text and c.eval_text and c.calib_text not in c.eval_text
    empty = tmp_path / "e.txt"
    empty.write_text("  \n")
    with pytest.raises(QuantbenchError, match="empty"):
        load_corpus(str(empty))
    with pytest.raises(QuantbenchError, match="unknown corpus"):
        load_corpus(str(tmp_path / "nope.txt"))
    binary = tmp_path / "b.txt"
    binary.write_bytes(b"\xff\xfe\x00\x81" * 10)
    with pytest.raises(QuantbenchError, match="cannot read"):
        load_corpus(str(binary))


def test_hub_corpus_offline_is_one_line():
    with pytest.raises(QuantbenchError) as e:
        load_corpus("wikitext2")
    assert "offline alternatives" in str(e.value) and "\n" not in str(e.value)


def test_wiki_calibration_and_evaluation_are_disjoint(wiki):
    assert len(wiki.eval_text) > 1_000_000 and len(wiki.calib_text) > 200_000
    eval_docs = {d.split("\n", 1)[0] for d in wiki.eval_text.split("\n\n")}
    calib_docs = {d.split("\n", 1)[0] for d in wiki.calib_text.split("\n\n")}
    assert "Anarchism" in eval_docs
    assert not eval_docs & calib_docs
    assert "[[" not in wiki.eval_text and "{{" not in wiki.eval_text and "<ref" not in wiki.eval_text


class _FakeHubSplit:
    """What load_dataset returns, enough for _hub_text: a text column of distinct documents."""
    column_names = ["text", "url"]

    def __init__(self, tag: str):
        self.tag = tag

    def __getitem__(self, col):
        return [f"{self.tag} document {i} " * 5 for i in range(40)]


@pytest.fixture
def hub_calls(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, split=None, **kw):
        calls.append({"path": path, "name": name, "split": split, **kw})
        return _FakeHubSplit(f"{path}/{split}")

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    return calls


@pytest.mark.parametrize("split, shard", [("train", "en/c4-train.00000-of-01024.json.gz"),
                                          ("validation", "en/c4-validation.00000-of-00008.json.gz")])
def test_c4_loads_the_first_shard_of_the_requested_split(hub_calls, split, shard):
    c = load_corpus(f"hf:allenai/c4:en:{split}")
    assert hub_calls == [{"path": "allenai/c4", "name": "en", "split": split, "data_files": {split: shard}}]
    assert f"split '{split}'" in c.split and f"allenai/c4/{split} document" in c.eval_text


def test_c4_unknown_split_is_one_line_and_loads_nothing(hub_calls):
    with pytest.raises(QuantbenchError) as e:
        load_corpus("hf:allenai/c4:en:test")
    assert "unknown split 'test'" in str(e.value) and "train" in str(e.value) and "\n" not in str(e.value)
    assert hub_calls == []


def test_builtin_c4_and_other_hub_datasets_pass_the_split_through(hub_calls):
    load_corpus("c4")  # the built-in: c4's validation split, divided disjointly
    load_corpus("hf:wikitext:wikitext-2-raw-v1:train")
    assert hub_calls == [{"path": "allenai/c4", "name": "en", "split": "validation",
                          "data_files": {"validation": "en/c4-validation.00000-of-00008.json.gz"}},
                         {"path": "wikitext", "name": "wikitext-2-raw-v1", "split": "train"}]
