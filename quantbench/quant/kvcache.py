"""The KV cache quantized as an engine stores it: K after RoPE, V as projected, one update at a time.

A recipe with `kv_at: cache` does not quantize the k/v projections' outputs (that is `kv_at: proj`, the
default, where K is quantized before RoPE over the whole prefill); instead every attention layer's
cache entry is fake-quantized when transformers writes it (`Cache.update`, after RoPE), and attention
runs over the stored (dequantized) K/V, the new tokens' own entries included, as vLLM's paged
attention reads them back from an fp8 cache.

Scale granularity, on the stored layout [B, H_kv, T, D] viewed per token as [B, T, H_kv * D]:
  token (dynamic)            one scale per token over all kv heads
  group, group_size = D      one scale per token and kv head (dynamic) / per kv head (static, calibrated)
  tensor (dynamic)           one scale per sequence over the tokens written by this update: it depends on
                             the other tokens of the update, so whole-prefill and decode order differ
  tensor (static)            one calibrated scale per layer for K and one for V: vLLM's fp8 kv cache
                             (compressed-tensors `kv_cache_scheme`: float, 8 bits, strategy tensor)
Static scales come from the min/max of the post-RoPE K (and V) over the calibration tokens
(llm-compressor's static min-max observer), fixed by `freeze()`.

The cache quantizer is attached to the model as a forward pre-hook (not a submodule: it adds no
weights to the state dict): a forward without a cache gets a fresh quantized one, and an empty cache
handed in (generate, lm-eval) has its layers replaced by quantizing ones. Only models whose every
layer is full attention are supported (as transformers' own QuantizedCache).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from ..core.errors import QuantbenchError
from .primitives import block_range, blocks, fake_quant, qparams_from_range
from .spec import QuantSpec

ATTR = "_qb_kv_cache"  # the model attribute holding its KVCacheQuant


class KVQuant:
    """One tensor kind (K or V) of one layer: fake-quantizes [B, H, T, D] states with `spec`; static
    specs observe ranges while `calibrating` and use the frozen (scale, zero) afterwards."""

    def __init__(self, spec: QuantSpec):
        self.spec = spec
        self.calibrating = False
        self.lo: torch.Tensor | None = None  # [1, G, 1] observed min (static specs)
        self.hi: torch.Tensor | None = None
        self.scale: torch.Tensor | None = None  # [1, G, 1] frozen qparams (static specs)
        self.zero: torch.Tensor | None = None

    def _observe(self, x: torch.Tensor) -> None:
        xb = blocks(x.detach().float(), self.spec.granularity, self.spec.group_size)  # [R, G, B]
        lo, hi = block_range(xb, self.spec, dims=(0, 2))  # [1, G, 1] over every token
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)

    def freeze(self, name: str) -> None:
        if self.spec.dynamic:
            return
        if self.lo is None:
            raise QuantbenchError(f"{name}: static kv scales were never calibrated")
        self.scale, self.zero = qparams_from_range(self.lo, self.hi, self.spec)
        self.calibrating = False

    def __call__(self, states: torch.Tensor) -> torch.Tensor:
        b, h, t, d = states.shape
        x = states.transpose(1, 2).reshape(b, t, h * d)  # [B, T, H*D]: a token's heads side by side
        if self.calibrating:
            if not self.spec.dynamic:
                self._observe(x)
            return states
        if not self.spec.dynamic:
            xq = fake_quant(x, self.spec, self.scale.to(x.device), self.zero.to(x.device))
        elif self.spec.granularity == "tensor":  # one scale per sequence over this update's tokens
            xq = torch.stack([fake_quant(x[i], self.spec) for i in range(b)])
        else:
            xq = fake_quant(x, self.spec)
        return xq.reshape(b, t, h, d).transpose(1, 2)  # [B, H, T, D]


class QuantKVLayer(DynamicLayer):
    """A DynamicLayer whose stored K/V are fake-quantized on the way in (each update once)."""

    def __init__(self, k: KVQuant, v: KVQuant):
        super().__init__()
        self.kq, self.vq = k, v

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return super().update(self.kq(key_states), self.vq(value_states), *args, **kwargs)


class KVCacheQuant:
    """Per-layer K and V quantizers of one model, and the hook that puts them in its caches."""

    def __init__(self, spec: QuantSpec, n_layers: int):
        self.spec = spec
        self.k = [KVQuant(spec) for _ in range(n_layers)]
        self.v = [KVQuant(spec) for _ in range(n_layers)]
        self.handle = None

    def layers(self) -> list[QuantKVLayer]:
        return [QuantKVLayer(k, v) for k, v in zip(self.k, self.v)]

    def quantize_cache(self, cache: Cache) -> Cache:
        """Replace an empty cache's layers by quantizing ones (in place); a cache already holding tokens
        that this quantizer did not store is refused."""
        if all(isinstance(x, QuantKVLayer) for x in cache.layers) and cache.layers:
            return cache
        if cache.get_seq_length() > 0:
            raise QuantbenchError("kv_at cache: the model was handed a KV cache that already holds unquantized "
                                  "tokens; start from an empty cache")
        cache.layers = self.layers()
        cache.layer_class_to_replicate = None
        return cache

    def set_calibrating(self, on: bool) -> None:
        for q in (*self.k, *self.v):
            q.calibrating = on

    def freeze(self) -> None:
        for i, (k, v) in enumerate(zip(self.k, self.v)):
            k.freeze(f"layer {i} k")
            v.freeze(f"layer {i} v")

    def scales(self) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
        """Static scales per layer (K, V), shaped [1, G, 1]; None for dynamic specs."""
        if self.spec.dynamic:
            return None
        return [k.scale for k in self.k], [v.scale for v in self.v]


def _pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    kvq: KVCacheQuant = getattr(module, ATTR)
    key = "cache" if kwargs.get("cache") is not None else "past_key_values"  # transformers 5.25 renames it to cache
    cache = kwargs.get(key)
    if cache is None:
        cache = DynamicCache()
    kwargs[key] = kvq.quantize_cache(cache)
    return args, kwargs


def _text_config(model: nn.Module):
    cfg = model.config
    return cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg


def head_dim(model: nn.Module) -> int:
    c = _text_config(model)
    return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


def check_kv_cache(model: nn.Module, spec: QuantSpec, recipe: str) -> None:
    """One-line errors for a model or spec the cache quantizer cannot serve."""
    c = _text_config(model)
    types = set(getattr(c, "layer_types", None) or ["full_attention"])
    if types != {"full_attention"}:
        raise QuantbenchError(f"recipe '{recipe}': kv_at cache supports models whose every layer is full attention "
                              f"(found {sorted(types)})")
    if getattr(c, "num_hidden_layers", None) is None or getattr(c, "num_attention_heads", None) is None:
        raise QuantbenchError(f"recipe '{recipe}': kv_at cache needs num_hidden_layers and num_attention_heads "
                              f"in the model config ({getattr(c, 'model_type', '?')})")
    hd = head_dim(model)
    if spec.granularity == "group" and spec.group_size != hd:
        raise QuantbenchError(f"recipe '{recipe}': kv group_size {spec.group_size} must be the head dimension {hd} "
                              "(one scale per kv head)")


def attach_kv_cache(model: nn.Module, spec: QuantSpec, recipe: str = "?") -> KVCacheQuant:
    """Quantize the model's KV cache as it is stored (see module doc); returns the quantizer (its static
    scales still to be calibrated: set_calibrating(True), run batches, freeze())."""
    check_kv_cache(model, spec, recipe)
    detach_kv_cache(model)
    kvq = KVCacheQuant(spec, _text_config(model).num_hidden_layers)
    object.__setattr__(model, ATTR, kvq)  # a plain attribute: nothing enters the state dict
    kvq.handle = model.register_forward_pre_hook(_pre_hook, with_kwargs=True)
    return kvq


def detach_kv_cache(model: nn.Module) -> None:
    kvq = getattr(model, ATTR, None)
    if kvq is not None:
        kvq.handle.remove()
        object.__delattr__(model, ATTR)


def kv_cache_quant(model: nn.Module) -> KVCacheQuant | None:
    return getattr(model, ATTR, None)


__all__ = ["KVQuant", "QuantKVLayer", "KVCacheQuant", "attach_kv_cache", "detach_kv_cache", "kv_cache_quant",
           "check_kv_cache", "head_dim"]
