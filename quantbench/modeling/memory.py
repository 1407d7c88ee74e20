"""Resident memory on Linux/glibc: freed tensors go back to the system, and weights that
transformers memory-mapped from safetensors files become ordinary process memory.

Two things kept the default run's peak resident set far above its weights (docs/scale.md):
- glibc's dynamic mmap threshold: after the first large tensor is freed, tensors of a few MiB are
  served from the heap, and freed ones stay resident there. `return_freed_memory()` fixes the
  threshold at 32 MiB (glibc's own ceiling for its dynamic threshold on 64-bit), so tensors above it
  are their own mappings, returned to the system when freed, and `trim_freed_memory()` (malloc_trim)
  gives back the heap's free pages after the FP reference and after each recipe's quantization and
  restore. A threshold of 128 KiB did the same
  without the trim, but then every activation of every forward was a fresh mapping whose pages the
  kernel faulted in and zeroed: lm-eval's cloze on the default model took 85 s instead of 58 s.
- transformers maps safetensors files into memory and the parameters point into the mapping. When a
  recipe replaced a linear, its weight was released, but the mapped file pages stayed resident
  until every tensor of the file was gone, and restore read fresh copies beside them: the weights
  counted twice. `own_mapped_weights(model)` copies every file-mapped CPU tensor into process memory
  right after loading, 64 MiB at a time, and drops the mapped pages of each piece once copied (madvise
  MADV_DONTNEED; on a private file mapping they read back as the file's bytes if touched again), so
  the peak while doing so is the weights plus one piece (not plus the largest tensor, e.g. a 128k x 8k
  embedding: 4 GiB in fp32).

Both are no-ops where the C library or /proc is not Linux/glibc.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import mmap
from pathlib import Path

import torch
import torch.nn as nn

_M_MMAP_THRESHOLD = -3  # mallopt parameter (malloc.h)
_MADV_DONTNEED = 4
_THRESHOLD = 32 << 20  # DEFAULT_MMAP_THRESHOLD_MAX on 64-bit glibc
CHUNK_BYTES = 64 << 20  # copied (and their mapped pages dropped) at a time


def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


def return_freed_memory() -> bool:
    """Fix glibc's mmap threshold at 32 MiB for this process (True when set): larger tensors go back
    to the system when freed; smaller ones are reused from the heap, whose free pages
    `trim_freed_memory()` returns."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, _THRESHOLD))


def trim_freed_memory() -> bool:
    """Give the heap's free pages back to the system (glibc's malloc_trim(0); True when some were)."""
    libc = _libc()
    if libc is None or not hasattr(libc, "malloc_trim"):
        return False
    return bool(libc.malloc_trim(0))


def mapped_files(suffix: str = ".safetensors") -> list[tuple[int, int]]:
    """[start, end) address ranges of this process's mappings of files ending in `suffix`."""
    out = []
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].endswith(suffix):
            a, b = parts[0].split("-")
            out.append((int(a, 16), int(b, 16)))
    return out


def _drop_pages(libc, start: int, nbytes: int) -> None:
    page = mmap.PAGESIZE
    a, b = -(-start // page) * page, (start + nbytes) // page * page  # whole pages inside the tensor
    if b > a:
        libc.madvise(ctypes.c_void_p(a), ctypes.c_size_t(b - a), _MADV_DONTNEED)


def _copy_out(t: torch.Tensor, libc) -> torch.Tensor:
    """A copy of the mapped tensor t in process memory, CHUNK_BYTES at a time, each piece's mapped pages
    dropped once copied (a fresh tensor's pages are resident only once written)."""
    if not t.is_contiguous():
        return t.clone()
    out = torch.empty_like(t, memory_format=torch.contiguous_format)
    src, dst = t.reshape(-1), out.reshape(-1)
    step = max(1, CHUNK_BYTES // t.element_size())
    for a in range(0, src.numel(), step):
        dst[a: a + step].copy_(src[a: a + step])
        _drop_pages(libc, src.data_ptr() + a * t.element_size(), min(step, src.numel() - a) * t.element_size())
    return out


@torch.no_grad()
def own_mapped_weights(model: nn.Module) -> int:
    """Copy the model's CPU parameters and buffers that point into a memory-mapped safetensors file
    into process memory, dropping the mapped pages piece by piece. Returns the bytes copied."""
    ranges = mapped_files()
    libc = _libc() if ranges else None
    if libc is None or not hasattr(libc, "madvise"):
        return 0
    copied, done = 0, set()
    for m in model.modules():
        for store in (m._parameters, m._buffers):
            for t in store.values():
                if t is None or t.device.type != "cpu" or id(t) in done or not t.numel():
                    continue
                done.add(id(t))
                p, n = t.data_ptr(), t.numel() * t.element_size()
                if not any(a <= p and p + n <= b for a, b in ranges):
                    continue
                t.data = _copy_out(t.data, libc)
                _drop_pages(libc, p, n)  # what the pieces left (pages across their borders)
                copied += n
    return copied


__all__ = ["mapped_files", "own_mapped_weights", "return_freed_memory", "trim_freed_memory"]
