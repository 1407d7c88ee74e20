"""Write a simulated model as a compressed-tensors checkpoint (what llm-compressor writes, vLLM and
transformers load): a Hugging Face folder with `quantization_config` in config.json and the
quantized tensors in safetensors.

    info = write_compressed(sim_model, plan, tokenizer, "out/")

The config is built with the library's own classes (QuantizationArgs / QuantizationScheme /
QuantizationConfig, written by ModelCompressor.update_config) and each module's format is the one the
library infers for its scheme (infer_module_format): int8 W8A8 -> int-quantized, int weight-only
(4 or 8 bits, per channel or group) -> pack-quantized, fp8 W8A8 -> float-quantized. One config group
per distinct (weights, activations) pair of the plan: the largest targets "Linear", the others name
their modules exactly (exact names win over class names in compressed-tensors' matching); every
unquantized linear is in `ignore`.

The tensors are OUR stored weights (QuantLinear.qweight: codes, scales, zero points) and calibrated
activation scales, laid out as the library's compressors lay them out (same names, shapes, dtypes,
and its own pack_to_int32 for packed codes): nothing is re-quantized here.

A `kv_at: cache` recipe with static fp8 KV scales (vLLM's fp8 kv cache) also writes `kv_cache_scheme` (float,
8 bits, strategy tensor or attn_head, static) and each attention module's calibrated `k_scale` / `v_scale`
(shape [1] per tensor, [kv heads, 1, 1] per head), where compressed-tensors registers them on the attention
module (initialize_attn_qparams) and vLLM reads them (`<layer>.self_attn.k_scale`).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from ..core.errors import QuantbenchError
from ..quant.kvcache import kv_cache_quant
from ..quant.plan import LinearPlan, Plan, fused_sets
from ..quant.qlinear import QuantLinear
from ..quant.spec import QuantSpec, Recipe


@dataclass
class CtExport:
    path: Path
    nbytes: int  # safetensors bytes
    format: str  # quantization_config.format (a single format, or mixed-precision)
    groups: dict[str, dict]  # group name -> {"targets": [...], "format": ..., "scheme": short}
    ignore: list[str]
    warnings: list[str] = field(default_factory=list)


def ct_args(spec: QuantSpec, activation: bool = False):
    """compressed-tensors QuantizationArgs for one of our specs."""
    from compressed_tensors.quantization import QuantizationArgs

    if spec.micro or spec.granularity == "block":
        return QuantizationArgs(**_fp_args(spec, activation))
    return QuantizationArgs(num_bits=spec.bits, type="float" if spec.format == "fp8" else "int",
                            symmetric=spec.symmetric, strategy=spec.granularity, group_size=spec.group_size,
                            dynamic=spec.dynamic if activation else False)


def _fp_args(spec: QuantSpec, activation: bool) -> dict:
    """The arguments of compressed-tensors' own presets (quant_scheme.py: FP8_BLOCK, NVFP4[A16], MXFP4[A16],
    MXFP8[A16]) for block fp8 weights and the microscaling formats."""
    if spec.granularity == "block":  # FP8_BLOCK's weights: [128, 128] tiles
        return {"num_bits": spec.bits, "type": "float" if spec.format == "fp8" else "int", "symmetric": spec.symmetric,
                "strategy": "block", "block_structure": [spec.group_size, spec.group_size], "dynamic": False}
    args = {"num_bits": spec.bits, "type": "float", "symmetric": True, "group_size": spec.group_size}
    if spec.format == "nvfp4":  # fp8 scales per 16 under an fp32 global scale; activations: the global one calibrated
        dtype = torch.float8_e4m3fn
        args |= {"strategy": "tensor_group", "dynamic": "local" if activation else False}
        if activation:
            args["observer"] = "static_minmax"
    else:  # OCP MX: e8m0 exponents (uint8) per 32
        dtype = torch.uint8
        args |= {"strategy": "group", "dynamic": activation}
    return args | {"scale_dtype": dtype, "zp_dtype": dtype}


def exports_kv_cache(recipe: Recipe) -> bool:
    """Whether compressed-tensors' kv_cache_scheme holds the recipe's KV: static fp8 scales per tensor or per kv
    head on the cache as stored (kv_at cache), vLLM's fp8 kv cache."""
    kv = recipe.kv
    return (recipe.kv_at == "cache" and kv is not None and kv.format == "fp8" and not kv.dynamic
            and kv.symmetric and kv.granularity in ("tensor", "group"))


def kv_cache_args(spec: QuantSpec):
    """compressed-tensors' kv_cache_scheme for a static fp8 cache spec (group = one scale per kv head)."""
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(num_bits=8, type="float", symmetric=True, dynamic=False,
                            strategy="tensor" if spec.granularity == "tensor" else "attn_head")


def attention_modules(model: nn.Module) -> list[str]:
    """Names of the attention modules that hold k_proj and v_proj, in layer order (where compressed-tensors puts
    k_scale / v_scale; its own is_cached_attention_module also asks for `past_key_values` in the forward's
    signature, which transformers 5.25 renamed `cache`)."""
    mods = dict(model.named_modules())
    return [n for n, m in mods.items() if "attention" in type(m).__name__.lower()
            and f"{n}.k_proj" in mods and f"{n}.v_proj" in mods]


def kv_cache_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Each attention module's calibrated k_scale / v_scale, in the shape compressed-tensors registers."""
    kvq = kv_cache_quant(model)
    scales = kvq.scales() if kvq is not None else None
    if scales is None:
        raise QuantbenchError("kv_cache_scheme: the model holds no calibrated static kv scales")
    attn = attention_modules(model)
    if len(attn) != len(scales[0]):
        raise QuantbenchError(f"kv_cache_scheme: {len(attn)} attention modules for {len(scales[0])} cache layers")
    shape = (1,) if kvq.spec.granularity == "tensor" else (-1, 1, 1)  # ours [1, G, 1] -> [1] / [H_kv, 1, 1]
    out = {}
    for name, k, v in zip(attn, *scales):
        out[f"{name}.k_scale"], out[f"{name}.v_scale"] = k.reshape(shape), v.reshape(shape)
    return out


def ct_scheme(lp: LinearPlan, targets: list[str]):
    """The QuantizationScheme of one planned linear, with the format the library infers for it."""
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.quantization import QuantizationScheme

    scheme = QuantizationScheme(targets=targets, weights=ct_args(lp.weights),
                                input_activations=ct_args(lp.activations, True) if lp.activations else None)
    scheme.format = infer_module_format(nn.Linear, scheme).value
    return scheme


def _groups(plan: Plan, names: list[str]) -> list[tuple[list[str], LinearPlan]]:
    """(module names, a representative plan entry) per distinct (weights, activations), largest first."""
    by_key: dict[tuple, list[str]] = {}
    for n in names:
        lp = plan.linears[n]
        by_key.setdefault((lp.weights, lp.activations), []).append(n)
    groups = sorted(by_key.values(), key=len, reverse=True)
    return [(g, plan.linears[g[0]]) for g in groups]


def build_config(model: nn.Module, plan: Plan, names: list[str]):
    """(QuantizationConfig, ignore list, per-group summary) for the quantized linears `names` (and the KV cache
    where kv_cache_scheme can hold it)."""
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus

    linears = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, QuantLinear))]
    ignore = [n for n in linears if n not in set(names)]
    schemes, summary = {}, {}
    for i, (members, lp) in enumerate(_groups(plan, names)):
        scheme = ct_scheme(lp, ["Linear"] if i == 0 else members)
        schemes[f"group_{i}"] = scheme
        summary[f"group_{i}"] = {"targets": scheme.targets if i == 0 else f"{len(members)} modules",
                                 "format": scheme.format, "weights": lp.weights.short(),
                                 "activations": lp.activations.short() if lp.activations else None}
    formats = {s.format for s in schemes.values()}
    fmt = formats.pop() if len(formats) == 1 else "mixed-precision"  # as compressed-tensors summarises formats
    kv = kv_cache_args(plan.recipe.kv) if exports_kv_cache(plan.recipe) else None
    if kv is not None:
        summary["kv_cache_scheme"] = {"strategy": kv.strategy, "kv": plan.recipe.kv.short()}
    qc = QuantizationConfig(config_groups=schemes, format=fmt, ignore=ignore, kv_cache_scheme=kv,
                            quantization_status=QuantizationStatus.COMPRESSED)
    return qc, ignore, summary


def module_tensors(name: str, q: QuantLinear, scheme) -> dict[str, torch.Tensor]:
    """The tensors compressed-tensors stores for one module, from our QTensor and activation scales."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    qt, w = q.qweight, q.plan.weights
    out: dict[str, torch.Tensor] = {f"{name}.weight_scale": qt.scale}
    if w.micro:
        out.update(_micro_tensors(name, qt, scheme))
    elif scheme.format == "pack-quantized":
        out[f"{name}.weight_packed"] = pack_to_int32(qt.codes, w.bits)  # [out, in * bits / 32] int32
        out[f"{name}.weight_shape"] = torch.tensor(qt.codes.shape)
        if not w.symmetric:
            zp = qt.zero_point
            out[f"{name}.weight_zero_point"] = pack_to_int32(zp, w.bits, packed_dim=0) \
                if w.granularity in ("group", "channel") else zp
    else:  # int-quantized / float-quantized / naive-quantized: the codes as int8 / float8_e4m3fn
        # block weights: own storage (the codes may be a view of the zero-padded tiles, which safetensors refuses)
        out[f"{name}.weight"] = qt.codes.clone() if w.granularity == "block" else qt.codes
        if not w.symmetric:
            out[f"{name}.weight_zero_point"] = qt.zero_point
    a = q.aspec
    if a is not None and a.format == "nvfp4":
        out[f"{name}.input_global_scale"] = q.a_global  # the calibrated fp32 global scale [1]
    if a is not None and not a.dynamic:
        out[f"{name}.input_scale"] = q.a_scale.reshape(1).to(qt.scale.dtype)  # static per-tensor: shape [1]
        if not a.symmetric:
            out[f"{name}.input_zero_point"] = q.a_zero.reshape(1)
    if q.bias is not None:
        out[f"{name}.bias"] = q.bias.data
    return out


def _micro_tensors(name: str, qt, scheme) -> dict[str, torch.Tensor]:
    """nvfp4 / mxfp4: e2m1 codes packed two per uint8 by the library's pack_fp4_to_uint8; mxfp8: e4m3 codes as
    they are. Scales through the format's own compressor (_compress_scale: fp8 for nvfp4, e8m0 uint8 for MX)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8

    compressor = BaseCompressor.get_value_from_registry(scheme.format)
    out = {f"{name}.weight_scale": compressor._compress_scale(qt.scale, scheme.weights)}
    if qt.spec.bits == 4:
        out[f"{name}.weight_packed"] = pack_fp4_to_uint8(qt.codes)  # [out, in / 2] uint8
    else:
        out[f"{name}.weight"] = qt.codes  # float8_e4m3fn
    if qt.global_scale is not None:
        out[f"{name}.weight_global_scale"] = qt.global_scale  # fp32 [1]
    return out


def _dense_state(model: nn.Module, skip: set[str]) -> dict[str, torch.Tensor]:
    """Every tensor of the model outside the quantized modules; a tied lm_head is stored once."""
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head is not None and head.weight is emb.weight
    sd = {}
    for key, t in model.state_dict().items():
        if key.rpartition(".")[0] in skip or (tied and head is not None and key == _name_of(model, head) + ".weight"):
            continue
        sd[key] = t
    return sd


def _name_of(model: nn.Module, mod: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is mod)


def _fused_warnings(plan: Plan, names: list[str]) -> list[str]:
    """vLLM fuses q/k/v and gate/up: each set must share one scheme."""
    out = []
    for group in fused_sets(names):
        if len({(plan.linears[n].weights, plan.linears[n].activations) for n in group}) > 1:
            prefix = group[0].rpartition(".")[0]
            out.append(f"{prefix}.{{{','.join(n.rpartition('.')[2] for n in group)}}} have different schemes: vLLM "
                       "fuses them into one matmul and refuses mixed schemes there (transformers loads it)")
    return out


def write_compressed(model: nn.Module, plan: Plan, tokenizer, out: str | Path) -> CtExport:
    """Write the simulated `model` (its QuantLinears hold the stored weights) to the folder `out`."""
    from compressed_tensors.compressors import ModelCompressor
    from huggingface_hub import save_torch_state_dict

    out = Path(out)
    qlinears = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    names = [n for n in plan.linears if n in qlinears]
    for n in names:
        if qlinears[n].released_bits is not None:
            raise RuntimeError(f"{n}: the stored weights were released (QuantContext.keep_stored=False)")
        if qlinears[n].qweight is None:
            raise QuantbenchError(f"{n}: activation-only quantization has no compressed-tensors format")
    out.mkdir(parents=True, exist_ok=True)
    sd = _dense_state(model, set(qlinears))
    qc, ignore, summary = (build_config(model, plan, names) if names else (None, [], {}))
    if qc is not None:
        for i, (members, lp) in enumerate(_groups(plan, names)):
            scheme = qc.config_groups[f"group_{i}"]
            for n in members:
                sd.update(module_tensors(n, qlinears[n], scheme))
        if qc.kv_cache_scheme is not None:
            sd.update(kv_cache_tensors(model))
    save_torch_state_dict({k: v.detach().cpu().contiguous() for k, v in sd.items()}, out, metadata={"format": "pt"})
    for f in out.glob("*.safetensors"):
        f.chmod(0o644)  # written through a private temporary file; a checkpoint is meant to be shared
    _write_config(model, out, qc)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    if qc is not None:
        ModelCompressor(quantization_config=qc).update_config(str(out))
    nbytes = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    return CtExport(out, nbytes, qc.format if qc is not None else "dense", summary, ignore,
                    _fused_warnings(plan, names))


def _write_config(model: nn.Module, out: Path, qc) -> None:
    """config.json (without any leftover quantization_config) and generation_config.json."""
    cfg = copy.deepcopy(model.config)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and head.weight is not emb.weight:
        cfg.tie_word_embeddings = False  # untied by quantization (lm_head on its own grid) or a mitigation
    cfg.save_pretrained(out)
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(out)
