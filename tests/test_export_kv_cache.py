"""Export of vLLM's fp8 kv cache (kv_at: cache, static scales): compressed-tensors' kv_cache_scheme in the config
and each attention module's k_scale / v_scale, reloaded by transformers' compressed-tensors loader with the scales
we calibrated, bit for bit; other KV recipes stay refused."""
from __future__ import annotations

import inspect
import json

import pytest
import torch
from conftest import tiny_model

from quantbench.export.compressed import write_compressed
from quantbench.export.refuse import ExportRefused, check_recipe
from quantbench.export.verify import reload_compressed
from quantbench.quant.apply import apply_recipe
from quantbench.quant.kvcache import kv_cache_quant
from quantbench.quant.recipes import resolve_recipe
from quantbench.quant.spec import QuantSpec

CPU = torch.device("cpu")
HD = 16  # the tiny llama's head dim (2 kv heads)


def _recipe(granularity: str) -> Recipe:
    kv = QuantSpec(bits=8, format="fp8", granularity=granularity, group_size=HD if granularity == "group" else None,
                   dynamic=False)
    base = resolve_recipe("w8a8-fp8-kv8")
    return base.model_copy(update={"kv": kv, "name": f"kv8-{granularity}"})


def _library_shape(args, n_kv: int, dtype: torch.dtype) -> torch.Size:
    """The k_scale shape compressed-tensors registers on an attention module for `args` (initialize_qparams with
    the observed shape of initialize_attn_qparams: (kv heads, None, head_dim))."""
    from compressed_tensors.quantization.lifecycle.initialize import initialize_qparams

    m = torch.nn.Module()
    m.register_parameter("w", torch.nn.Parameter(torch.zeros(1, dtype=dtype)))
    initialize_qparams(m, "k", args, observed_shape=(n_kv, None, HD), observed_dtype=dtype, force_zero_point=False)
    return m.k_scale.shape


@pytest.mark.parametrize("granularity,strategy", [("tensor", "tensor"), ("group", "attn_head")])
def test_kv_cache_scheme_and_scales_are_stored_as_compressed_tensors_expects(tmp_path, granularity, strategy):
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    from quantbench.export.verify import kv_cache_check

    recipe = _recipe(granularity)
    check_recipe(recipe, "compressed-tensors")  # exportable
    calib = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    sim, applied = apply_recipe(tiny_model("llama", attn_implementation="sdpa"), recipe, calib, batch_size=2)
    write_compressed(sim, applied.plan, None, tmp_path)
    qc = QuantizationConfig.model_validate(json.loads((tmp_path / "config.json").read_text())["quantization_config"])
    kvs = qc.kv_cache_scheme  # parsed by the library itself
    assert (kvs.type, kvs.num_bits, kvs.strategy, kvs.dynamic, kvs.symmetric) == ("float", 8, strategy, False, True)
    shape = _library_shape(kvs, 2, torch.float32)
    stored = load_file(next(tmp_path.glob("*.safetensors")))
    kvq = kv_cache_quant(sim)
    for i in range(2):
        for which, q in (("k", kvq.k[i]), ("v", kvq.v[i])):
            t = stored[f"model.layers.{i}.self_attn.{which}_scale"]  # where vLLM and compressed-tensors read it
            assert t.shape == shape and torch.equal(t, q.scale.reshape(shape)), (i, which)
    reloaded = reload_compressed(tmp_path, torch.float32, "sdpa", CPU)  # loads (the library skips the kv scheme)
    cols = kv_cache_check(tmp_path, sim, reloaded)
    assert cols["export_kv_scales_equal"] == "4/4"
    if cols["export_kv_scales_reloaded"] != "4/4":  # compressed-tensors 0.20.1 with transformers 5.25
        params = inspect.signature(reloaded.model.layers[0].self_attn.forward).parameters  # what the library reads
        assert "past_key_values" not in params and "cache" in params and cols["export_kv_note"]


@pytest.mark.parametrize("name", ["w4a4-kv4-cache", "w4a4-kv4"])
def test_other_kv_recipes_stay_refused(name):
    with pytest.raises(ExportRefused, match="kv_cache_scheme"):
        check_recipe(resolve_recipe(name), "compressed-tensors")
