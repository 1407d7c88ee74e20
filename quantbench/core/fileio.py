"""File I/O every layer may use: atomic writes, tolerant JSON reads, the rows store.

- every file is written to a temporary name in the same folder and renamed into place, so a
  reader never sees half a file; an OSError (full disk, read-only path) is one line naming the
  path and the errno;
- rows.jsonl is append-only, one row per line, each row written with one `write` and fsynced;
  a last line cut by a hard kill is dropped (and said) before the next append.
"""
from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

from .errors import QuantbenchError
from .log import log as _log

STALE_ROWS = "rows.stale.jsonl"


class OutputError(QuantbenchError):
    """A file or folder could not be written (full disk, read-only or wrong path)."""


def os_error_text(path: Path | str, e: OSError) -> str:
    return f"{path}: [Errno {e.errno}] {e.strerror or e}"


# ---------------------------------------------------------------- atomic writes
def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")  # keeps the suffix (savefig)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it is fsynced and renamed onto `path`.

    For writers that take a path (DataFrame.to_csv, Figure.savefig). On OSError the temporary
    file is removed and an OutputError names `path` and the errno."""
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise OutputError(f"cannot write {os_error_text(path, e)}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, default=str))


def read_json_or_none(path: Path) -> dict | None:
    """A derived JSON file's content, or None when it is missing or damaged (it is then recomputed)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# ---------------------------------------------------------------- rows store
class RowsError(QuantbenchError):
    """rows.jsonl holds a line that is not a row (damage, not an interrupted append)."""


def _parse_row(path: Path, lineno: int, raw: bytes) -> dict:
    try:
        row = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        why = str(e).splitlines()[0][:80]
        raise RowsError(f"{path} line {lineno} is not a valid row ({why}); delete that line to recompute "
                        f"that recipe, or move the file aside to recompute all") from None
    if not isinstance(row, dict) or not isinstance(row.get("recipe"), str):
        raise RowsError(f"{path} line {lineno} is not a valid row (no recipe name); delete that line to "
                        f"recompute that recipe, or move the file aside to recompute all")
    return row


def read_rows(path: Path) -> list[dict]:
    """Every row of a rows.jsonl, in file order. A last line without its newline that does not
    parse (an append cut by a hard kill) is ignored; any other bad line is a RowsError naming it."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as e:
        raise OutputError(f"cannot read {os_error_text(path, e)}") from None
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    rows = [_parse_row(path, i, raw) for i, raw in enumerate(lines, 1) if raw.strip()]
    if tail.strip():
        with contextlib.suppress(RowsError):
            rows.append(_parse_row(path, len(lines) + 1, tail))
    return rows


def latest_by_recipe(rows: list[dict]) -> dict[str, dict]:
    """The last row of each recipe (a recomputed row follows the one it replaces)."""
    return {r["recipe"]: r for r in rows}


class RowStore:
    """rows.jsonl of a run directory: append-only, one JSON row per line."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def repair_tail(self) -> None:
        """Drop a last line cut by a hard kill (or restore the newline of a complete one)."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        if not data or data.endswith(b"\n"):
            return
        cut = data.rfind(b"\n") + 1
        try:
            _parse_row(self.path, data.count(b"\n") + 1, data[cut:])
        except RowsError:
            with open(self.path, "rb+") as f:
                f.truncate(cut)
                os.fsync(f.fileno())
            _log(f"{self.path.name}: dropped an incomplete last line ({len(data) - cut} bytes, a write cut "
                 "by a hard kill); that recipe is recomputed")
            return
        self._write(b"\n")

    def load(self) -> list[dict]:
        self.repair_tail()
        return read_rows(self.path)

    def append(self, row: dict) -> None:
        self._write((json.dumps(row, default=str) + "\n").encode("utf-8"))

    def append_many(self, rows: list[dict]) -> None:
        self.repair_tail()
        self._write("".join(json.dumps(r, default=str) + "\n" for r in rows).encode("utf-8"))

    def rewrite(self, rows: list[dict]) -> None:
        atomic_write_text(self.path, "".join(json.dumps(r, default=str) + "\n" for r in rows))

    def _write(self, data: bytes) -> None:
        """One O_APPEND write, fsynced; on failure the partial bytes are cut off again."""
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as e:
            raise OutputError(f"cannot write {os_error_text(self.path, e)}") from None
        start = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except BaseException as e:  # a full disk, or a signal between two partial writes
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
            if isinstance(e, OSError):
                raise OutputError(f"cannot write {os_error_text(self.path, e)}") from None
            raise
        finally:
            os.close(fd)
