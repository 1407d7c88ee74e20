"""Run-directory handling: the output root, the run lock, and interruption (atomic writes and
the rows store are in quantbench/core/fileio.py).

Guarantees (tests/test_reliability*.py check each):
- one process at a time writes a run directory (an flock on `.quantbench.lock`, released by
  the kernel when its holder dies, so a lock left by a killed process is simply taken over);
- SIGTERM is turned into the same clean stop as Ctrl-C (`Interrupted`, raised by the CLI's handler).
"""
from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

from ..core.errors import QuantbenchError
from ..core.fileio import OutputError, _log, os_error_text

LOCK_NAME = ".quantbench.lock"


class RunLocked(QuantbenchError):
    """Another live process is writing this run directory."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so the same clean stop runs (quantbench.cli)."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


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
        except ImportError:  # not Linux/macOS: no lock (documented in docs/limits.md)
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


