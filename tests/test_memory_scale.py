"""What keeps a sweep's peak memory at the weights plus a constant (docs/scale.md, benchmarks/memory_scale.py):
- a sweep's quantized linears drop their stored codes once the dequantized weight exists; their size
  (counted by hand here) and output are those of a linear that keeps them, and a sweep's rows equal the
  rows computed with every stored form kept;
- loading copies mapped weights out, and the pristine snapshot checks them against the file, a piece at
  a time: the values equal the file's (read by safetensors itself), and a byte that differs is caught."""
from __future__ import annotations

import pytest
import torch
from conftest import save_tiny_llama
from safetensors.torch import load_file
from test_pipeline import _cfg, text_file, tiny_dir  # noqa: F401  (fixtures)
from transformers import AutoModelForCausalLM

from quantbench.modeling import memory, pristine
from quantbench.modeling.load import load_model
from quantbench.modeling.pristine import Pristine, safetensors_index
from quantbench.quant.apply import apply_recipe
from quantbench.quant.plan import LinearPlan
from quantbench.quant.qlinear import QuantLinear
from quantbench.quant.recipes import PRESETS
from quantbench.run import cell, pipeline


def _held_bytes(mod: torch.nn.Module) -> int:
    """Bytes of every tensor the module holds: parameters, buffers, and tensors in its attributes
    (one level into dataclasses such as a QTensor)."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if torch.is_tensor(t) and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()
    for t in [*mod.parameters(), *mod.buffers()]:
        add(t)
    for v in vars(mod).values():
        add(v)
        for w in getattr(v, "__dict__", {}).values():
            add(w)
    return total


# preset -> its weights' bits by hand: codes at `bits` bits, one 16-bit scale per block (symmetric: no zero points)
_BY_HAND = {"w8a8-token": lambda o, i: o * i * 8 + o * 16, "w4a16-g64": lambda o, i: o * i * 4 + o * (i // 64) * 16}


@pytest.mark.parametrize("preset", ["w8a8-token", "w4a16-g64", "fp8-block", "nvfp4", "mxfp4"])
def test_a_released_linear_keeps_its_size_and_output(preset):
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 128, bias=False)
    r = PRESETS.get(preset)
    plan = LinearPlan("x", r.weights, r.activations, None, "simulated")
    kept, released = QuantLinear(lin, plan), QuantLinear(lin, plan)
    released.release_stored()
    assert released.qweight is None and kept.qweight is not None
    assert released.storage_bits() == kept.storage_bits()
    if preset in _BY_HAND:
        assert kept.storage_bits() == _BY_HAND[preset](128, 256)
    assert _held_bytes(released) == 128 * 256 * 4  # the fp32 weight, nothing else of weight size
    assert _held_bytes(kept) >= 128 * 256 * 4 + 128 * 256  # + the codes (int8, or fp32 values for fp4)
    x = torch.randn(3, 5, 256)
    if r.activations is not None and r.activations.calibrated:
        for q in (kept, released):
            q.calibrating = True
            q(x)
            q.freeze()
    assert torch.equal(released(x), kept(x))


_RECIPES = ("fp", "w8a8-token", "w4a16-g64", "w8a8-tensor-static-sq", "w4a16-g64-gptq", "nvfp4a16")


def _metrics(rows: dict) -> dict:
    return {k: {f: v for f, v in r.items() if not f.endswith("_s") and f not in ("calib_stats_reused", "peak_mem_mb")}
            for k, r in rows.items()}


def test_a_sweep_holds_no_codes_and_its_rows_equal_the_rows_with_codes_kept(tiny_dir, text_file, tmp_path,  # noqa: F811
                                                                            monkeypatch):
    held: list[list] = []
    score = cell.EvalSuite.score

    def spy(self, model, *a, **k):  # what the quantized linears hold while a recipe is scored
        held.append([(q.qweight, q.released_bits) for q in model.modules() if isinstance(q, QuantLinear)])
        return score(self, model, *a, **k)
    monkeypatch.setattr(cell.EvalSuite, "score", spy)
    dropped = pipeline.load_rows(pipeline.run(_cfg(tiny_dir, text_file, tmp_path / "a", _RECIPES)) / "rows.jsonl")
    assert len(held) == len(_RECIPES) - 1 and all(held)
    assert all(qw is None and bits > 0 for qs in held for qw, bits in qs)
    real = cell.QuantContext
    monkeypatch.setattr(cell, "QuantContext", lambda **k: real(**{**k, "keep_stored": True}))  # as export builds it
    kept = pipeline.load_rows(pipeline.run(_cfg(tiny_dir, text_file, tmp_path / "b", _RECIPES)) / "rows.jsonl")
    assert all(r["status"] == "ok" for r in dropped.values())
    assert _metrics(dropped) == _metrics(kept)


def test_weights_are_copied_out_and_checked_a_piece_at_a_time(tmp_path, monkeypatch):
    d = save_tiny_llama(tmp_path / "m")
    ref = load_file(str(next(d.glob("*.safetensors"))))  # the file's values, read by safetensors itself
    monkeypatch.setattr(memory, "CHUNK_BYTES", 1000)  # many pieces per tensor, borders inside pages
    monkeypatch.setattr(pristine, "CHUNK_BYTES", 1000)
    m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    assert memory.own_mapped_weights(m) > 0
    state = m.state_dict()
    assert all(torch.equal(state[k], v) for k, v in ref.items())
    assert not [n for n, p in m.named_parameters() if any(a <= p.data_ptr() < b for a, b in memory.mapped_files())]

    files = safetensors_index(d)
    assert all(files[k].holds(state[k]) for k in ref)


def test_the_check_compares_bytes_a_piece_at_a_time(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    monkeypatch.setattr(pristine, "CHUNK_BYTES", 64)  # 16 floats a piece
    x = torch.arange(100, dtype=torch.float32) - 1  # x[1] == 0.0
    save_file({"x": x}, str(tmp_path / "a.safetensors"))
    stored = safetensors_index(tmp_path)["x"]
    assert stored.holds(x.clone())
    y = x.clone()
    y[-1] = 1000.0  # in the last (short) piece
    assert not stored.holds(y)
    y = x.clone()
    y[1] = -0.0  # equal values, other bytes: restoring from the file would not give these back
    assert torch.equal(y, x) and not stored.holds(y)
    assert not stored.holds(x[:50])
    assert stored.holds(x.to(torch.bfloat16))  # a converted dtype: compared as values (exact here)


def test_restore_gives_back_the_files_bytes_with_pieces(tiny_dir, monkeypatch):  # noqa: F811
    monkeypatch.setattr(memory, "CHUNK_BYTES", 4096 + 8)
    monkeypatch.setattr(pristine, "CHUNK_BYTES", 4096 + 8)
    lm = load_model(str(tiny_dir), device="cpu", dtype="float32")
    ref = load_file(str(next(tiny_dir.glob("*.safetensors"))))
    pr = Pristine(lm.model, lm.folder)
    assert pr.file_bytes == sum(p.numel() * 4 for p in lm.model.parameters())  # every parameter checked equal
    apply_recipe(lm.model, PRESETS.get("w8a8-tensor-static-rot"), torch.randint(3, 1000, (2, 16)))
    pr.restore()
    state = lm.model.state_dict()
    for k, v in ref.items():
        assert state[k].dtype == v.dtype and torch.equal(state[k].view(torch.int32), v.view(torch.int32)), k
