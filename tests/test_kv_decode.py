"""The KV cache quantized as the engine stores it (quantbench/quant/kvcache.py, recipes with kv_at: cache):
decode order against whole prefill, and vLLM's static fp8 kv scales against compressed-tensors.

Tolerances: decode order and whole prefill run the same arithmetic on differently shaped matmuls, so their
hidden states agree to float rounding, not bit for bit. The comparisons run in float64 (rounding ~1e-16)
with fp8 schemes, whose absmax element maps to 448 exactly (no rounding tie), so a per-token scheme's
logits agree to 1e-9. (compressed-tensors' symmetric int grid maps a token's absmax to ±(qmax-qmin)/2 =
±7.5 for int4, a rounding tie: x / (|x| / 7.5) rounds to either side of 7.5, so 1-ulp noise upstream moves
a negative absmax element by a whole step (-8 or -7). Int KV therefore agrees between orders only up to
those flips, which on the tiny random model move logits by about half the kv quantization effect itself.)
"""
from __future__ import annotations

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle.forward import fake_quantize
from compressed_tensors.quantization.utils import calculate_qparams
from conftest import tiny_model
from transformers.cache_utils import DynamicCache

from quantbench.eval.lm import decode_order_logits
from quantbench.quant.apply import apply_recipe
from quantbench.quant.kvcache import attach_kv_cache, detach_kv_cache, kv_cache_quant
from quantbench.quant.recipes import resolve_recipe
from quantbench.quant.spec import QuantSpec, Recipe

HD = 16  # the tiny llama's head dim (hidden 64, 4 heads; 2 kv heads)
FP8_TOKEN = QuantSpec(bits=8, format="fp8", granularity="token", dynamic=True)
FP8_HEAD = QuantSpec(bits=8, format="fp8", granularity="group", group_size=HD, dynamic=True)
FP8_TENSOR_DYN = QuantSpec(bits=8, format="fp8", granularity="tensor", dynamic=True)


def _model():
    return tiny_model("llama", attn_implementation="sdpa").double()


def _ids(b=2, t=24):
    return torch.randint(0, 128, (b, t), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def _orders(spec: QuantSpec):
    """(FP logits, whole-prefill logits, decode-order logits for chunks 1 and 5) with the cache quantized by spec."""
    m, ids = _model(), _ids()
    fp = m(input_ids=ids, use_cache=False).logits
    attach_kv_cache(m, spec)
    prefill = m(input_ids=ids, use_cache=False).logits
    return fp, prefill, decode_order_logits(m, ids, 1), decode_order_logits(m, ids, 5)


@pytest.mark.parametrize("spec", [FP8_TOKEN, FP8_HEAD], ids=["token", "head"])
def test_decode_order_equals_prefill_for_per_token_scales(spec):
    fp, prefill, tok, chunk = _orders(spec)
    assert (prefill - fp).abs().max() > 1e-4  # the cache is quantized
    torch.testing.assert_close(tok, prefill, rtol=0, atol=1e-9)
    torch.testing.assert_close(chunk, prefill, rtol=0, atol=1e-9)


def test_sequence_dependent_scale_differs_between_orders():
    """A dynamic per-tensor scale spans the tokens of one update: whole prefill (future tokens included)
    and token-by-token storage quantize the same tokens differently."""
    fp, prefill, tok, chunk = _orders(FP8_TENSOR_DYN)
    assert (tok - prefill).abs().max() > 1e-3 and (chunk - tok).abs().max() > 1e-3


def test_decode_stored_cache_is_quantized_once():
    """The stored K of every token stays what was written (a later update does not requantize it)."""
    m, ids = _model(), _ids(1, 6)
    attach_kv_cache(m, FP8_TENSOR_DYN)
    cache = DynamicCache()
    with torch.no_grad():
        m(input_ids=ids[:, :3], past_key_values=cache, use_cache=True)
        first = cache.layers[1].keys.clone()
        m(input_ids=ids[:, 3:], past_key_values=cache, use_cache=True)
    assert torch.equal(cache.layers[1].keys[:, :, :3], first)


def _post_rope_kv(model, ids):
    """K (after RoPE) and V per layer as transformers' own DynamicCache stores them: [B, H, T, D] each."""
    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
    return [(x.keys, x.values) for x in cache.layers]


def _applied(recipe: Recipe, calib: torch.Tensor):
    m, _ = apply_recipe(tiny_model("llama", attn_implementation="sdpa"), recipe, calib, batch_size=2)
    return m


@pytest.mark.parametrize("preset,strategy", [("w8a8-fp8-kv8", "tensor"), ("w8a8-fp8-kv8-head", "attn_head")])
def test_static_fp8_kv_scales_match_compressed_tensors(preset, strategy):
    """vLLM's fp8 kv cache: per-layer (or per-kv-head) scales from the min/max of the post-RoPE K and V over
    the calibration tokens (llm-compressor's static min-max observer), then compressed-tensors' qparams; the
    stored cache is compressed-tensors' fake_quantize of K after RoPE."""
    spec = resolve_recipe(preset).kv
    if spec.granularity == "group":
        spec = spec.model_copy(update={"group_size": HD})
    w = QuantSpec(bits=8, format="fp8")
    calib, ids = _ids(4, 32), _ids(1, 16)
    m = _applied(Recipe(name=preset, weights=w, kv=spec, kv_at="cache"), calib)
    ref = _applied(Recipe(name="ref", weights=w), calib)  # same weights, K/V stored unquantized
    kvq = kv_cache_quant(m)
    args = QuantizationArgs(num_bits=8, type="float", strategy=strategy, symmetric=True, dynamic=False)
    dims = (0, 1, 2, 3) if strategy == "tensor" else (0, 2, 3)
    calib_kv = [_post_rope_kv(ref, calib[j: j + 2]) for j in (0, 2)]
    for layer in range(len(kvq.k)):
        for which, q in enumerate((kvq.k[layer], kvq.v[layer])):
            x = torch.cat([c[layer][which] for c in calib_kv], dim=0)  # [N, H, T, D]
            scale, _ = calculate_qparams(x.amin(dim=dims).reshape(-1), x.amax(dim=dims).reshape(-1), args)
            assert torch.equal(q.scale.reshape(-1), scale.reshape(-1)), (layer, which)
    # layer 0's input does not depend on kv quantization: its stored cache is compressed-tensors' fake_quantize
    stored, raw = _post_rope_kv(m, ids), _post_rope_kv(ref, ids)
    for which, q in enumerate((kvq.k[0], kvq.v[0])):
        s = q.scale.reshape(-1, 1, 1)  # [1 or H, 1, 1] broadcast over [B, H, T, D]
        assert torch.equal(stored[0][which], fake_quantize(raw[0][which], s, torch.zeros_like(s), args))
    assert not torch.equal(stored[0][0], raw[0][0])


def test_recipe_dump_keeps_default_kv_at_out():
    """Row keys of recipes written before kv_at do not change: the default is left out of the dump."""
    assert "kv_at" not in resolve_recipe("w4a4-kv4").model_dump(mode="json")
    r = resolve_recipe("w8a8-fp8-kv8")
    assert r.model_dump(mode="json")["kv_at"] == "cache" and Recipe.model_validate(r.model_dump(mode="json")) == r


def test_cache_kv_rejects_bad_specs():
    with pytest.raises(ValueError, match="static kv scales"):
        Recipe(name="x", kv=QuantSpec(bits=8, format="fp8", granularity="token", dynamic=False), kv_at="cache")
    with pytest.raises(ValueError, match="needs a kv spec"):
        Recipe(name="x", kv_at="cache")
    with pytest.raises(ValueError, match="KV-only recipes are not supported"):
        Recipe(name="x", kv=QuantSpec(bits=8, format="fp8", granularity="tensor", dynamic=False), kv_at="cache")
    m = tiny_model("llama")
    from quantbench.core.errors import QuantbenchError
    with pytest.raises(QuantbenchError, match="head dimension 16"):
        attach_kv_cache(m, QuantSpec(bits=8, format="fp8", granularity="group", group_size=32, dynamic=False))
