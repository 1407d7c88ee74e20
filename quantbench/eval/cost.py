"""Cost measurements: peak memory while a variant is evaluated.

CPU: the process's peak resident set size (VmHWM), reset before the measurement by writing 5 to
/proc/self/clear_refs (Linux); it includes everything the process holds (the FP model and the
FP reference too), so compare it across recipes of one run, not as a model size. CUDA:
torch.cuda.max_memory_allocated after a reset. None where neither is available.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch


def _vm_hwm_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@contextmanager
def peak_memory(device: torch.device) -> Iterator[dict]:
    """Yield a dict that holds {'peak_mem_mb': float | None} once the block exits."""
    out: dict = {"peak_mem_mb": None}
    cuda = device.type == "cuda" and torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    reset = _reset_hwm() if not cuda else False
    try:
        yield out
    finally:
        if cuda:
            out["peak_mem_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        elif reset:
            v = _vm_hwm_mb()
            out["peak_mem_mb"] = round(v, 1) if v is not None else None
