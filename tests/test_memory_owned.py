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
