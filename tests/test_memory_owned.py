"""quantbench/modeling/memory.py: weights memory-mapped by transformers become process memory after loading,
with the file's values, and glibc's mmap threshold can be fixed (Linux/glibc, where CI runs)."""
from __future__ import annotations

import platform

import pytest
import torch
from conftest import save_tiny_llama
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from quantbench.modeling.load import load_model
from quantbench.modeling.memory import mapped_files, own_mapped_weights, return_freed_memory


def _in_mapping(model) -> list[str]:
    ranges = mapped_files()
    return [n for n, p in model.named_parameters()
            if any(a <= p.data_ptr() < b for a, b in ranges)]


def test_transformers_maps_the_file_and_own_mapped_weights_copies_it_out(tmp_path):
    d = save_tiny_llama(tmp_path / "m")
    m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    assert _in_mapping(m)  # the premise: parameters point into the mapped safetensors file
    copied = own_mapped_weights(m)
    assert not _in_mapping(m)
    assert copied >= sum(p.numel() * 4 for n, p in m.named_parameters() if n != "lm_head.weight") * 0.9
    ref = load_file(str(next(d.glob("*.safetensors"))))  # the file's values, read by safetensors itself
    state = m.state_dict()
    assert all(torch.equal(state[k], v) for k, v in ref.items())
    out = m(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(out).all()


def test_load_model_owns_its_weights(tmp_path):
    d = save_tiny_llama(tmp_path / "m")
    lm = load_model(str(d), device="cpu")
    assert not _in_mapping(lm.model)
    ref = load_file(str(next(d.glob("*.safetensors"))))
    state = lm.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in ref.items())


def test_mmap_threshold_is_set_on_glibc():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    assert return_freed_memory() is True


_FREED = r"""
import gc, json, sys, torch
from quantbench.modeling.memory import return_freed_memory, trim_freed_memory

def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) // 1024

assert return_freed_memory()
out = {"base": rss()}
big = [torch.ones(48 << 18) for _ in range(8)]           # 8 x 48 MiB: above the threshold, own mappings
out["big"] = rss(); del big; gc.collect(); out["big_freed"] = rss()
small, keep = [], []
for _ in range(128):                                     # 128 x 4 MiB from the heap, each followed by a
    small.append(torch.ones(1 << 20))                    # small live tensor: freed, they are holes
    keep.append(torch.ones(1 << 12))                     # that cannot merge into the heap's top
out["small"] = rss(); del small; gc.collect(); out["small_freed"] = rss()
out["trimmed"] = (trim_freed_memory(), rss())
print(json.dumps(out))
"""


def test_freed_tensors_leave_the_process(tmp_path):
    """Tensors above the 32 MiB threshold go back to the system when freed; smaller ones once the
    heap is trimmed (RSS read from /proc, in a fresh process)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt and malloc_trim are glibc's")
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _FREED], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    assert m["big"] - m["base"] >= 350 and m["big_freed"] - m["base"] < 40, m
    assert m["small"] - m["big_freed"] >= 450, m
    assert m["small_freed"] - m["big_freed"] >= 400, m      # without a trim the heap keeps them resident
    trimmed, after = m["trimmed"]
    assert trimmed is True and after - m["big_freed"] < 40, m
