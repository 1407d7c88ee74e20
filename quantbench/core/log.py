"""One logger for the whole package: `log("...")` prints `[quantbench] ...` to stderr.

Library code calls `log`; nothing else prints progress. QUANTBENCH_QUIET=1 silences it. (It writes
to whatever sys.stderr is at call time, so captured output in tests and notebooks just works.)
"""
from __future__ import annotations

import os
import sys


def log(msg: str) -> None:
    """One progress line on stderr."""
    if not os.environ.get("QUANTBENCH_QUIET"):
        print(f"[quantbench] {msg}", file=sys.stderr, flush=True)
