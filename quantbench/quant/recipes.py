"""Named recipe presets. A config lists presets by name, or full recipes, or a preset plus overrides."""
from __future__ import annotations

from typing import Any

from ..core.errors import ConfigError
from ..core.registry import Registry, UnknownName
from .backends.gguf import GGUF_TYPES, gguf_weight_spec
from .spec import MitigationSpec, QuantSpec, Recipe

W8_CH = QuantSpec(bits=8, granularity="channel")
W4_CH = QuantSpec(bits=4, granularity="channel")
W4_G64 = QuantSpec(bits=4, granularity="group", group_size=64)
W4_G128 = QuantSpec(bits=4, granularity="group", group_size=128)
A8_TOK = QuantSpec(bits=8, granularity="token", dynamic=True)
A8_TENSOR_DYN = QuantSpec(bits=8, granularity="tensor", dynamic=True)
A8_TENSOR_STATIC = QuantSpec(bits=8, granularity="tensor", dynamic=False)
A4_TOK = QuantSpec(bits=4, granularity="token", dynamic=True)
FP8_CH = QuantSpec(bits=8, format="fp8", granularity="channel")
A_FP8_TOK = QuantSpec(bits=8, format="fp8", granularity="token", dynamic=True)
KV4_HEAD = QuantSpec(bits=4, granularity="group", group_size=64, dynamic=True)  # one scale per head (hd 64) and token
# compressed-tensors' float presets (quantization/quant_scheme.py), the same arguments
FP8_TENSOR = QuantSpec(bits=8, format="fp8", granularity="tensor")
A_FP8_TENSOR_STATIC = QuantSpec(bits=8, format="fp8", granularity="tensor", dynamic=False)
FP8_BLOCK = QuantSpec(bits=8, format="fp8", granularity="block", group_size=128)  # 128x128 weight tiles
A_FP8_G128 = QuantSpec(bits=8, format="fp8", granularity="group", group_size=128, dynamic=True)  # 1x128 per token
NVFP4 = QuantSpec(format="nvfp4")  # e2m1, fp8 scale per 16, fp32 global scale (activations: calibrated)
MXFP4 = QuantSpec(format="mxfp4")  # e2m1, e8m0 exponent per 32
MXFP8 = QuantSpec(format="mxfp8")  # e4m3, e8m0 exponent per 32
KV8_TOK = QuantSpec(bits=8, granularity="token", dynamic=True)
# vLLM's fp8 kv cache (kv_cache_dtype fp8, compressed-tensors kv_cache_scheme): static e4m3 scales calibrated on
# the post-RoPE K and V, one per layer (tensor) or per kv head (group = head_dim, 64 on the default model)
KV_FP8_STATIC = QuantSpec(bits=8, format="fp8", granularity="tensor", dynamic=False)
KV_FP8_HEAD_STATIC = QuantSpec(bits=8, format="fp8", granularity="group", group_size=64, dynamic=False)


def _r(name: str, w=None, a=None, kv=None, mit=(), backend="simulated", kv_at="proj", **backend_options) -> Recipe:
    mits = tuple(MitigationSpec(name=m) if isinstance(m, str) else m for m in mit)
    return Recipe(name=name, weights=w, activations=a, kv=kv, mitigations=mits, backend=backend,
                  backend_options=backend_options, kv_at=kv_at)


def _m(name: str, **options) -> MitigationSpec:
    return MitigationSpec(name=name, options=options)


PRESETS: Registry[Recipe] = Registry("preset")
for _recipe in [
    _r("fp"),
    _r("as-loaded"),  # an already-quantized checkpoint, evaluated as it was loaded (quantbench/modeling/prequant.py)
    _r("w8a16", W8_CH),
    _r("w8a8-token", W8_CH, A8_TOK),
    _r("w8a8-tensor-dynamic", W8_CH, A8_TENSOR_DYN),
    _r("w8a8-tensor-static", W8_CH, A8_TENSOR_STATIC),
    _r("w4a16-channel", W4_CH),
    _r("w4a16-g64", W4_G64),
    _r("w4a16-g128", W4_G128),
    _r("w4a8-token", W4_G64, A8_TOK),
    _r("w4a4-token", W4_G64, A4_TOK),
    _r("w4a4-kv4", W4_G64, A4_TOK, KV4_HEAD),
    _r("w8a8-fp8", FP8_CH, A_FP8_TOK),
    # compressed-tensors' presets by their own names (FP8, FP8_DYNAMIC, FP8_BLOCK, NVFP4, ...), round-to-nearest
    _r("fp8", FP8_TENSOR, A_FP8_TENSOR_STATIC),
    _r("fp8-dynamic", FP8_CH, A_FP8_TOK),
    _r("fp8-block", FP8_BLOCK, A_FP8_G128),
    _r("nvfp4", NVFP4, NVFP4),
    _r("nvfp4a16", NVFP4),
    _r("mxfp4", MXFP4, MXFP4),
    _r("mxfp4a16", MXFP4),
    _r("mxfp8", MXFP8, MXFP8),
    _r("mxfp8a16", MXFP8),
    _r("w4afp8", W4_G128, A_FP8_TOK),
    # KV cache quantized as the engine stores it (K after RoPE; quant/kvcache.py)
    _r("w8a8-fp8-kv8", FP8_CH, A_FP8_TOK, KV_FP8_STATIC, kv_at="cache"),
    _r("w8a8-fp8-kv8-head", FP8_CH, A_FP8_TOK, KV_FP8_HEAD_STATIC, kv_at="cache"),
    _r("w4a4-kv4-cache", W4_G64, A4_TOK, KV4_HEAD, kv_at="cache"),
    # mitigated variants
    _r("w8a8-tensor-static-sq", W8_CH, A8_TENSOR_STATIC, mit=[_m("smoothquant", alpha=0.5)]),
    _r("w8a8-tensor-static-ot", W8_CH, A8_TENSOR_STATIC, mit=["outlier_tokens"]),
    _r("w8a8-tensor-static-sq-ot", W8_CH, A8_TENSOR_STATIC, mit=[_m("smoothquant", alpha=0.5), "outlier_tokens"]),
    _r("w8a8-tensor-dynamic-int8", W8_CH, A8_TENSOR_DYN, mit=[_m("int8_decomp", threshold=6.0)]),
    _r("w8a8-tensor-static-rot", W8_CH, A8_TENSOR_STATIC, mit=["rotate"]),
    _r("w4a16-g64-gptq", W4_G64, mit=["gptq"]),
    _r("w4a16-g64-awq", W4_G64, mit=["awq", "clip"]),
    _r("w4a16-channel-gptq", W4_CH, mit=["gptq"]),
    _r("w4a16-g64-autoround", W4_G64, mit=["autoround"]),
    _r("w4a16-g64-asym-autoround", W4_G64.model_copy(update={"symmetric": False}), mit=["autoround"]),
    _r("nvfp4a16-autoround", NVFP4, mit=["autoround"]),
    _r("w4a8-token-rot-gptq", W4_G64, A8_TOK, mit=["rotate", "gptq"]),
    _r("w4a4-token-rot", W4_G64, A4_TOK, mit=["rotate"]),
    _r("w4a4-token-rot-gptq", W4_G64, A4_TOK, mit=["rotate", "gptq"]),
    _r("w4a4-kv4-rot-gptq", W4_G64, A4_TOK, KV4_HEAD, mit=["rotate", "gptq"]),
    # the float formats with mitigations (issue 23 §2): GPTQ with the format's own column quantizer
    # (quant/mitigations/gptq.py, "Float formats"), SmoothQuant before fp8 / fp4 activations
    _r("nvfp4a16-gptq", NVFP4, mit=["gptq"]),
    _r("mxfp4a16-gptq", MXFP4, mit=["gptq"]),
    _r("nvfp4-gptq", NVFP4, NVFP4, mit=["gptq"]),
    _r("mxfp4-gptq", MXFP4, MXFP4, mit=["gptq"]),
    _r("nvfp4-rot-gptq", NVFP4, NVFP4, mit=["rotate", "gptq"]),
    _r("mxfp4-rot-gptq", MXFP4, MXFP4, mit=["rotate", "gptq"]),
    _r("nvfp4-sq", NVFP4, NVFP4, mit=[_m("smoothquant", alpha=0.5)]),
    _r("mxfp4-sq", MXFP4, MXFP4, mit=[_m("smoothquant", alpha=0.5)]),
    _r("fp8-sq", FP8_TENSOR, A_FP8_TENSOR_STATIC, mit=[_m("smoothquant", alpha=0.5)]),
    _r("fp8-dynamic-sq", FP8_CH, A_FP8_TOK, mit=[_m("smoothquant", alpha=0.5)]),
    # real kernels (skipped with the reason where they cannot run)
    _r("bnb-int8", W8_CH, backend="bnb-int8", threshold=0.0),
    _r("bnb-int8-t6", W8_CH, backend="bnb-int8", threshold=6.0),
    _r("bnb-nf4", QuantSpec(bits=4, granularity="group", group_size=64), backend="bnb-nf4"),
    _r("bnb-fp4", QuantSpec(bits=4, granularity="group", group_size=64), backend="bnb-fp4"),
    _r("quanto-w8", W8_CH, backend="quanto"),
    _r("quanto-w8a8", W8_CH, A8_TENSOR_STATIC, backend="quanto"),
    _r("quanto-w4-g64", QuantSpec(bits=4, granularity="group", group_size=64, symmetric=False), backend="quanto"),
]:
    PRESETS.register(_recipe.name, _recipe)
# llama.cpp types through the gguf package (lm_head in the plan: llama-quantize stores the output matrix as Q8_0)
for _qt in GGUF_TYPES:
    PRESETS.register(f"gguf-{_qt.lower()}", Recipe(name=f"gguf-{_qt.lower()}", weights=gguf_weight_spec(_qt),
                                                   backend="gguf", backend_options={"qtype": _qt}, exclude=()))
# llama.cpp's own quantizer (backend llamacpp, the cyllama wheel): its file types, with and without an importance
# matrix; `weights` is bookkeeping (code bits, 32-element sub-blocks), llama.cpp picks each tensor's type
_LLAMACPP = {"Q4_K_M": QuantSpec(bits=4, symmetric=False, granularity="group", group_size=32),
             "Q5_K_M": QuantSpec(bits=5, symmetric=False, granularity="group", group_size=32),
             "Q6_K": QuantSpec(bits=6, granularity="group", group_size=16),
             "IQ4_XS": QuantSpec(bits=4, granularity="group", group_size=32)}
for _ft, _w in _LLAMACPP.items():
    for _im in (False, True):
        _name = f"gguf-{_ft.lower()}" + ("-imatrix" if _im else "")
        PRESETS.register(_name, Recipe(name=_name, weights=_w, backend="llamacpp", exclude=(),
                                       backend_options={"ftype": _ft, "imatrix": _im}))


def _preset(name: str) -> Recipe:
    try:
        return PRESETS.get(name, "recipes")
    except UnknownName as e:
        raise ConfigError(str(e)) from None


def resolve_recipe(entry: str | dict[str, Any]) -> Recipe:
    """A config entry -> Recipe. Strings name a preset; dicts are a recipe, optionally `preset:` + overrides."""
    if isinstance(entry, str):
        return _preset(entry)
    if not isinstance(entry, dict):
        raise ConfigError(f"recipes: each entry must be a preset name or a mapping, got {type(entry).__name__}")
    entry = dict(entry)
    base = entry.pop("preset", None)
    if base is not None:
        merged = _preset(base).model_dump()
        merged.update(entry)
        entry = merged
    return Recipe.model_validate(entry)
