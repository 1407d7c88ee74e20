"""Our importance matrix equals llama.cpp's definition, written out here: per weight of the decoder layers,
in_sum2[j] = Σ over tokens of x_j² (x: the linear's input), counts = tokens; stored as llama.cpp's GGUF
imatrix file (general.type "imatrix", `<weight>.in_sum2` ne [n_in, 1], `<weight>.counts` ne [1, 1]),
read back with the gguf package's GGUFReader."""
from __future__ import annotations

import gguf
import numpy as np
import torch
from conftest import tiny_model

from quantbench.quant.imatrix import collect_imatrix, write_imatrix

_GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
         "mlp.down_proj": "ffn_down"}


def _definition(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, tuple[np.ndarray, int]]:
    """GGUF weight name -> (Σ_tokens x², tokens), from every input each decoder linear sees, in float64."""
    seen: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.startswith("model.layers."):
            i, rest = name.removeprefix("model.layers.").split(".", 1)
            key = f"blk.{i}.{_GGUF[rest]}.weight"
            handles.append(mod.register_forward_pre_hook(lambda m, a, k=key: seen.setdefault(k, []).append(a[0])))
    with torch.no_grad():
        model(input_ids=ids[:2])  # two forward passes, as batches of 2 and 1
        model(input_ids=ids[2:])
    for h in handles:
        h.remove()
    out = {}
    for key, xs in seen.items():
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in xs]).double()  # [tokens, in]
        out[key] = ((x * x).sum(0).numpy(), x.shape[0])
    return out


def test_imatrix_file_is_the_sum_of_squared_inputs_per_column(tmp_path):
    model = tiny_model("llama", layers=2, hidden=64)
    with torch.no_grad():  # a planted hot input column: the matrix must single it out
        model.model.embed_tokens.weight[:, 5] *= 30
    ids = torch.randint(0, 128, (3, 20), generator=torch.Generator().manual_seed(0))
    want = _definition(model, ids)
    path = write_imatrix(tmp_path / "imatrix.gguf", collect_imatrix(model, ids, batch_size=2), "wiki-calib", 20)
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.type"].contents() == "imatrix"
    assert "general.architecture" not in reader.fields
    assert reader.fields["imatrix.datasets"].contents() == ["wiki-calib"]
    assert reader.fields["imatrix.chunk_count"].contents() == 3 and reader.fields["imatrix.chunk_size"].contents() == 20
    tensors = {t.name: t for t in reader.tensors}
    assert list(tensors) == [f"{k}.{s}" for k in sorted(want) for s in ("in_sum2", "counts")]
    for key, (sum2, n) in want.items():
        t, c = tensors[f"{key}.in_sum2"], tensors[f"{key}.counts"]
        assert t.tensor_type == gguf.GGMLQuantizationType.F32 and list(t.shape) == [len(sum2), 1]
        np.testing.assert_allclose(np.asarray(t.data).reshape(-1), sum2, rtol=1e-6)  # float32 in the file
        assert list(c.shape) == [1, 1] and float(np.asarray(c.data).reshape(-1)[0]) == n == 60
    q = np.asarray(tensors["blk.0.attn_q.weight.in_sum2"].data).reshape(-1)
    assert q.argmax() == 5  # the planted column dominates attn_q's input (after RMSNorm) too
