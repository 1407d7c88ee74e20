"""Run-directory handling: atomic writes, the rows store, the run lock, and interruption.

Guarantees (tests/test_reliability*.py check each):
- every file is written to a temporary name in the same folder and renamed into place, so a
  reader never sees half a file; an OSError (full disk, read-only path) is one line naming the
  path and the errno;
- rows.jsonl is append-only, one row per line, each row written with one `write` and fsynced;
  a last line cut by a hard kill is dropped (and said) before the next append;
- one process at a time writes a run directory (an flock on `.quantbench.lock`, released by
  the kernel when its holder dies, so a lock left by a killed process is simply taken over);
- SIGTERM is turned into the same clean stop as Ctrl-C (`Interrupted`, raised by the CLI's handler).
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

from .errors import QuantbenchError

LOCK_NAME = ".quantbench.lock"
STALE_ROWS = "rows.stale.jsonl"


class OutputError(QuantbenchError):
    """A file or folder could not be written (full disk, read-only or wrong path)."""


class RunLocked(QuantbenchError):
    """Another live process is writing this run directory."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so the same clean stop runs (quantbench.cli)."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def os_error_text(path: Path | str, e: OSError) -> str:
    return f"{path}: [Errno {e.errno}] {e.strerror or e}"


def _log(msg: str) -> None:
    print(f"[quantbench] {msg}", file=sys.stderr, flush=True)


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


# ---------------------------------------------------------------- output root
def check_output_dir(out: Path) -> None:
    """Fail before any work when `out` cannot become a run directory (one line, no folder made)."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"output path {out} exists and is not a directory; choose another --out or --run-id")
    probe = out
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe != out and not probe.is_dir():
        raise OutputError(f"cannot create {out}: {probe} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(f"cannot create {out}: {probe} is not writable")


def make_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create {os_error_text(path, e)}") from None


# ---------------------------------------------------------------- lock
class RunLock:
    """An exclusive flock on `<dir>/.quantbench.lock`; the file holds the holder's PID."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        if self.fd is not None:
            return self
        try:
            import fcntl
        except ImportError:  # not Linux/macOS: no lock (documented in README)
            return self
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise OutputError(f"cannot create the run lock {os_error_text(self.path, e)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunLocked(f"run directory {self.path.parent} is in use by another quantbench process "
                            f"(PID {holder}); wait for it to finish or stop it, then rerun") from None
        except OSError as e:  # a file system without locks (some network mounts): go on, and say so
            _log(f"warning: cannot lock {os_error_text(self.path, e)}; two runs into this directory "
                 "at once would not be stopped")
        previous = os.read(fd, 64).decode(errors="replace").strip()
        if previous.isdigit() and int(previous) != os.getpid() and not _alive(int(previous)):
            _log(f"taking over the run lock left by PID {previous} (no longer running)")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, 0)  # a clean exit leaves no PID; a killed holder's PID stays
            os.close(self.fd)  # closing drops the flock; the file stays (unlinking would race)
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
