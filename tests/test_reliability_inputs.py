"""Reliability: damaged model files, a damaged asset cache, bad corpora, and what hub corpora
calibrate on. Each case: exit code, the one `error:` line naming the file and the repair, no
run directory left behind."""
from __future__ import annotations

import json
import os
import shutil
import sys
import types

import pytest
from reliability_common import assert_error, cli, corpus_text, env, tiny_model, write_config

from quantbench.data import wheels
from quantbench.data.corpus import load_corpus


def _run(capsys, env, **over):
    root, model, corpus = env
    res = cli(capsys, "run", "-c", write_config(root, over.pop("model", model), corpus, **over))
    if res.rc != 0:
        assert not (root / "out").exists(), "a failed run must not leave a run directory"
    return res


# ---------------------------------------------------------------- damaged model files
def test_truncated_safetensors(capsys, env):
    st = env[1] / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    assert_error(_run(capsys, env), f"model file {st} is damaged", "its header describes", "re-download")


def test_overwritten_safetensors_header(capsys, env):
    st = env[1] / "model.safetensors"
    data = bytearray(st.read_bytes())
    data[:8] = (1 << 62).to_bytes(8, "little")
    st.write_bytes(bytes(data))
    assert_error(_run(capsys, env), f"model file {st} is damaged", "unreadable safetensors header")


def test_garbage_inside_safetensors_header_json(capsys, env):
    st = env[1] / "model.safetensors"
    data = bytearray(st.read_bytes())
    data[10:40] = b"\x00" * 30
    st.write_bytes(bytes(data))
    assert_error(_run(capsys, env), str(st), "damaged")


def test_truncated_config_json(capsys, env):
    cfg = env[1] / "config.json"
    cfg.write_text(cfg.read_text()[:50])
    assert_error(_run(capsys, env), f"model file {cfg} is damaged", "not valid JSON")


def test_damaged_tokenizer_json(capsys, env):
    tok = env[1] / "tokenizer.json"
    tok.write_bytes(tok.read_bytes()[:-30])
    assert_error(_run(capsys, env), f"model file {tok} is damaged")


def test_damaged_tokenizer_config(capsys, env):
    tc = env[1] / "tokenizer_config.json"
    tc.write_bytes(b"\xff\xfe garbage")
    assert_error(_run(capsys, env), f"model file {tc} is damaged")


def test_config_the_loader_cannot_use_is_one_line(capsys, env):
    cfg = env[1] / "config.json"
    data = json.loads(cfg.read_text())
    data["num_attention_heads"] = "many"
    cfg.write_text(json.dumps(data))
    assert_error(_run(capsys, env), f"cannot load model '{env[1]}'", "re-download or re-save the model")


def _gguf(path, cut: int | None = None, junk: bool = False):
    import gguf
    import numpy as np

    if junk:
        path.write_bytes(b"not a gguf file at all " * 20)
        return path
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.ones((64, 64), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if cut:
        path.write_bytes(path.read_bytes()[:-cut])
    return path


def test_truncated_gguf(capsys, env):
    g = _gguf(env[0] / "m.gguf", cut=5000)
    assert_error(_run(capsys, env, model=g), f"model file {g} is damaged", "not a readable GGUF",
                 "re-download or re-export")


def test_not_a_gguf(capsys, env):
    g = _gguf(env[0] / "junk.gguf", junk=True)
    assert_error(_run(capsys, env, model=g), f"model file {g} is damaged", "GGUF magic")


def test_missing_model_paths(capsys, env):
    assert_error(_run(capsys, env, model=env[0] / "nope.gguf"), "model file not found")
    (env[0] / "empty").mkdir()
    assert_error(_run(capsys, env, model=env[0] / "empty"), "has no config.json")


# ---------------------------------------------------------------- damaged asset cache
@pytest.fixture
def cache(tmp_path, monkeypatch, env):
    """A private QUANTBENCH_CACHE whose `default` model is the tiny model, installed by the real
    ensure_default_model with the conversion step replaced by a copy (the real one takes 30 s)."""
    downloads = wheels.cache_dir() / "downloads"
    monkeypatch.setenv("QUANTBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(wheels, "_VERIFIED", {})

    def convert(stage):
        for f in env[1].iterdir():
            shutil.copy(f, stage / f.name)

    monkeypatch.setattr(wheels, "_convert_default_model", convert)
    wheels.ensure_default_model()
    return tmp_path / "cache", downloads


def _default_run(capsys, env):
    return _run(capsys, env, model="default")


def test_sealed_cache_loads(capsys, env, cache):
    res = _default_run(capsys, env)
    assert res.rc == 0, res.err


def test_bytes_overwritten_in_cached_weights(capsys, env, cache):
    st = wheels.default_model_dir() / "model.safetensors"
    data = bytearray(st.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = b"\x7f" * 64  # same size: only the content hash sees it
    st.write_bytes(bytes(data))
    assert_error(_default_run(capsys, env), f"cached model file {st} is damaged", "sha256",
                 "quantbench assets fetch --force")


def test_bit_rot_with_unchanged_mtime_is_caught_by_the_next_process(capsys, env, cache, monkeypatch):
    st = wheels.default_model_dir() / "model.safetensors"
    stat = st.stat()
    data = bytearray(st.read_bytes())
    data[-100] ^= 0xFF
    st.write_bytes(bytes(data))
    os.utime(st, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    monkeypatch.setattr(wheels, "_VERIFIED", {})  # a new process has verified nothing yet
    assert_error(_default_run(capsys, env), str(st), "quantbench assets fetch --force")


def test_content_hash_once_per_process_unless_mtime_changes(cache, monkeypatch):
    calls = []
    real = wheels.sha256_file
    monkeypatch.setattr(wheels, "sha256_file", lambda p: calls.append(p.name) or real(p))
    monkeypatch.setattr(wheels, "_VERIFIED", {})
    wheels.ensure_default_model()
    n = len(calls)
    wheels.ensure_default_model()
    assert n >= 2 and len(calls) == n, "unchanged files are hashed once per process"
    cfg = wheels.default_model_dir() / "config.json"
    os.utime(cfg, ns=(cfg.stat().st_atime_ns, cfg.stat().st_mtime_ns + 10**9))
    wheels.ensure_default_model()
    assert calls[n:] == ["config.json"]


def test_truncated_cached_weights(capsys, env, cache):
    st = wheels.default_model_dir() / "model.safetensors"
    with open(st, "rb+") as f:
        f.truncate(st.stat().st_size - 1000)
    assert_error(_default_run(capsys, env), f"cached model file {st} is damaged", "bytes",
                 "quantbench assets fetch --force")


def test_missing_cached_tokenizer(capsys, env, cache):
    (wheels.default_model_dir() / "tokenizer.json").unlink()
    assert_error(_default_run(capsys, env), "tokenizer.json is missing", "quantbench assets fetch --force")


def test_damaged_cache_metadata(capsys, env, cache):
    meta = wheels.default_model_dir() / wheels.ASSET_META
    meta.write_text(meta.read_text()[:40])
    assert_error(_default_run(capsys, env), f"cached model metadata {meta} is damaged",
                 "quantbench assets fetch --force")


@pytest.fixture
def news(cache, monkeypatch):
    """The real 'news' corpus extracted into the private cache from the verified gensim wheel."""
    cache_root, downloads = cache
    wheel = downloads / wheels.WHEELS["gensim"].filename
    if not wheel.exists():
        pytest.skip("gensim wheel not in the cache (run `quantbench assets fetch`)")
    (cache_root / "downloads").mkdir(parents=True, exist_ok=True)
    os.symlink(wheel, cache_root / "downloads" / wheel.name)
    monkeypatch.setattr(wheels, "CORPORA", {"news": wheels.CORPORA["news"]})
    return wheels.ensure_corpus("news")


def test_cached_corpus_cut_in_half(capsys, env, news):
    ev = news["eval"]
    ev.write_text(ev.read_text()[: ev.stat().st_size // 2])
    assert_error(_run(capsys, env, corpus={"name": "news"}), f"cached corpus 'news' file {ev} is damaged",
                 "quantbench assets fetch --force")


@pytest.mark.integration  # converts the real default model again: all cores
def test_fetch_force_repairs_model_and_corpus(capsys, env, news, monkeypatch):
    import quantbench.data.assets as assets
    import quantbench.data.taskpack as taskpack

    # the task pack is not this test's business (tests/test_taskpack.py): patched where `assets fetch` looks it up
    monkeypatch.setattr(assets, "ensure_task_pack", lambda force=False: taskpack.pack_dir())
    original = news["eval"].read_bytes()
    news["eval"].write_bytes(original[:1000])
    st = wheels.default_model_dir() / "model.safetensors"
    st.write_bytes(st.read_bytes()[:-10])
    assert_error(_run(capsys, env, model="default", corpus={"name": "news"}), "quantbench assets fetch --force")
    res = cli(capsys, "assets", "fetch", "--force")
    assert res.rc == 0, res.err
    assert news["eval"].read_bytes() == original
    monkeypatch.setattr(wheels, "_VERIFIED", {})
    assert _run(capsys, env, model="default", corpus={"name": "news"}).rc == 0


# ---------------------------------------------------------------- corpora
def test_corpus_not_utf8(capsys, env):
    env[2].write_bytes(b"good text " * 50 + b"\xff\xfe\x81" + b" more" * 50)
    assert_error(_run(capsys, env), f"cannot read corpus file {env[2]}", "not UTF-8", "byte 500")


def test_corpus_empty(capsys, env):
    env[2].write_text("  \n\n ")
    assert_error(_run(capsys, env), f"corpus file {env[2]} is empty")


def test_corpus_with_nul_bytes(capsys, env):
    env[2].write_bytes(corpus_text().encode() + b"\x00" * 64)
    assert_error(_run(capsys, env), f"corpus file {env[2]} is damaged", "NUL")


def test_corpus_is_a_folder(capsys, env):
    assert_error(_run(capsys, env, corpus={"name": str(env[0])}), "is a folder")


def test_unknown_corpus_and_malformed_hub_spec(capsys, env):
    assert_error(_run(capsys, env, corpus={"name": "wikki"}), "unknown corpus 'wikki'")
    assert_error(_run(capsys, env, corpus={"name": "hf:only-a-name"}), "use hf:<dataset>:<split>")


def test_too_short_for_eval_names_eval_seq_len(capsys, env):
    env[2].write_text(corpus_text(n_paras=5, words=6))
    line = assert_error(_run(capsys, env), "evaluation corpus too short", "lower eval.seq_len")
    assert "calib_seq_len" not in line and "census" not in line


def test_too_short_for_calibration_names_calib_seq_len(capsys, env):
    env[2].write_text(corpus_text(n_paras=40, words=10))
    line = assert_error(_run(capsys, env, corpus={"name": str(env[2]), "calib_seq_len": 128}),
                        "calibration corpus too short", "lower corpus.calib_seq_len")
    assert "eval.seq_len" not in line and "census" not in line


def test_too_short_for_census_names_census_seq_len(capsys, env):
    env[2].write_text(corpus_text(n_paras=40, words=10))
    line = assert_error(_run(capsys, env, census={"enabled": True, "seq_len": 512}),
                        "census corpus too short", "lower census.seq_len")
    assert "calib_seq_len" not in line


# ---------------------------------------------------------------- hub corpora: what calibrates
class _FakeSplit:
    def __init__(self, docs):
        self.docs, self.column_names = docs, ["text"]

    def __getitem__(self, col):
        return self.docs


@pytest.fixture
def fake_hub(monkeypatch):
    """datasets.load_dataset replaced by a recorder serving documents per split (no hub here)."""
    docs = {split: [f"{split} document {i}: " + corpus_text(1, 30, shift=i) for i in range(40)]
            for split in ("train", "test", "validation")}
    asked = []

    def load_dataset(name, config=None, split=None, **kw):
        asked.append((name, config, split))
        return _FakeSplit(docs[split])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return docs, asked


def test_hf_split_calibrates_on_a_disjoint_part(fake_hub):
    docs, asked = fake_hub
    c = load_corpus("hf:acme/docs:test")
    calib, ev = set(c.calib_text.split("\n\n")), set(c.eval_text.split("\n\n"))
    assert calib and ev and not calib & ev, "calibration text must not overlap the evaluation text"
    assert calib | ev == set(docs["test"]) and {s for _, _, s in asked} == {"test"}
    assert "split 'test'" in c.split and "disjoint" in c.split and "calibrate" in c.split


def test_hf_split_is_recorded_in_the_manifest(capsys, env, fake_hub):
    res = _run(capsys, env, corpus={"name": "hf:acme/docs:test"})
    assert res.rc == 0, res.err
    man = json.loads((env[0] / "out" / "r" / "manifest.json").read_text())
    assert man["corpus"]["name"] == "hf:acme/docs:test" and "split 'test'" in man["corpus"]["split"]
    assert man["corpus"]["fingerprint"]["calib"] != man["corpus"]["fingerprint"]["eval"]


def test_wikitext2_calibrates_on_train_and_evaluates_on_test(fake_hub):
    docs, asked = fake_hub
    c = load_corpus("wikitext2")
    assert c.calib_text == "\n\n".join(docs["train"]) and c.eval_text == "\n\n".join(docs["test"])
    assert "calibration: split 'train'" in c.split and "evaluation: split 'test'" in c.split
