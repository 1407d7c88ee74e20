"""Our quantization grids are compressed-tensors' grids (what llm-compressor writes and vLLM loads).

For every QuantSpec setting (int 2-8 bits, symmetric / asymmetric, tensor / channel / group / token,
static / dynamic; fp8 e4m3) the codes are torch.equal and scales / zero points equal to float
tolerance to what compressed-tensors 0.20 itself computes (its calculate_qparams, quantize,
dequantize, fake_quantize, and compute_dynamic_scales_and_zp for dynamic activations), on random
and on outlier-heavy tensors (1000x entries, all-zero and constant rows / groups / tokens), fp32
and bf16. torchao's affine primitives are checked where they have the scheme; where the two
references differ (docs/quantization.md, "Grid convention"), the difference is asserted exactly.
"""
from __future__ import annotations

import compressed_tensors.quantization.lifecycle.forward as ct  # noqa: E402  (a dependency: never skipped)
import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs  # noqa: E402
from compressed_tensors.quantization.utils import calculate_qparams, compute_dynamic_scales_and_zp  # noqa: E402

from quantbench.core.errors import QuantbenchError  # noqa: E402
from quantbench.quant.primitives import (  # noqa: E402
    FP8_DTYPE,
    _fake_quant_sym,
    block_range,
    blocks,
    dequantize,
    fake_quant,
    int_range,
    qparams_from_range,
    quantize,
    quantize_weight,
)
from quantbench.quant.spec import QuantSpec  # noqa: E402

BITS = tuple(range(2, 9))
DTYPES = (torch.float32, torch.bfloat16)
KINDS = ("random", "outliers", "zeros")
GS = 32


def _spec(gran: str, bits: int = 8, symmetric: bool = True, fmt: str = "int", clip: float = 1.0) -> QuantSpec:
    return QuantSpec(bits=bits, format=fmt, symmetric=symmetric, granularity=gran,
                     group_size=GS if gran == "group" else None, clip_ratio=clip)


def _args(spec: QuantSpec, dynamic: bool) -> QuantizationArgs:
    return QuantizationArgs(num_bits=spec.bits, type="float" if spec.format == "fp8" else "int",
                            symmetric=spec.symmetric, strategy=spec.granularity, group_size=spec.group_size,
                            dynamic=dynamic)


def _weight(kind: str, dtype: torch.dtype) -> torch.Tensor:
    """[24, 128]: random rows of varied range; outliers add 1000x entries, an all-zero row, constant
    positive / negative rows, an all-positive row, an all-zero group and a constant group."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 128, generator=g) * (torch.rand(24, 1, generator=g) * 2 + 0.01)
    if kind == "outliers":
        w[0, 5], w[6, 100], w[13, 64] = 1000.0, -1000.0, 1000.0 * w[13, 64]
        w[1], w[2], w[3] = 0.0, 0.37, -1.5
        w[4, 32:64], w[5, :32] = 0.0, 2.0
        w[7] = w[7].abs() + 0.5
    if kind == "zeros":
        w = torch.zeros_like(w)
    return w.to(dtype)


def _activation(kind: str, dtype: torch.dtype) -> torch.Tensor:
    """[2, 12, 128] (batch, tokens, hidden): a systematic outlier channel, a massive token, an all-zero
    token, constant tokens."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 12, 128, generator=g)
    if kind == "outliers":
        x[..., 17] *= 1000.0
        x[0, 0] *= 300.0
        x[0, 3], x[1, 5], x[1, 6] = 0.0, 0.5, -3.0
    if kind == "zeros":
        x = torch.zeros_like(x)
    return x.to(dtype)


def _assert_codes_equal(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert ours.dtype == ref.dtype and ours.shape == ref.shape, what
    if ours.dtype == FP8_DTYPE:  # compare the stored bytes
        ours, ref = ours.view(torch.uint8), ref.view(torch.uint8)
    assert torch.equal(ours, ref), f"{what}: {int((ours != ref).sum())} codes differ"


def _assert_qparams_equal(scale, zero, ref_scale, ref_zero, what: str) -> None:
    torch.testing.assert_close(scale, ref_scale, rtol=1e-6, atol=0, msg=what)
    assert zero.dtype == ref_zero.dtype, what
    assert torch.equal(zero.float(), ref_zero.float()), what


def _ct_weight(w: torch.Tensor, spec: QuantSpec):
    """compressed-tensors' stored weight: llm-compressor's min-max observer (flatten_for_calibration,
    amin / amax over the observation and element dims, in the weight's dtype), calculate_qparams,
    quantize to the stored dtype; plus its dequantize and fake_quantize."""
    if spec.granularity == "tensor":
        v = w.reshape(1, 1, -1)  # (1, 1, numel)
    elif spec.granularity == "channel":
        v = w.unsqueeze(-2).unsqueeze(0)  # (1, rows, 1, cols)
    else:
        v = w.unflatten(-1, (-1, spec.group_size)).unsqueeze(0)  # (1, rows, groups, group_size)
    lo, hi = v.amin(dim=(0, -1)) * spec.clip_ratio, v.amax(dim=(0, -1)) * spec.clip_ratio
    args = _args(spec, dynamic=False)
    scale, zero = calculate_qparams(lo, hi, args)
    codes = ct.quantize(w, scale, zero, args, dtype=FP8_DTYPE if spec.format == "fp8" else torch.int8)
    return codes, scale, zero, ct.dequantize(codes, scale, zero, args), ct.fake_quantize(w, scale, zero, args)


def _check_weight(w: torch.Tensor, spec: QuantSpec, what: str) -> None:
    codes, scale, zero, deq, fake = _ct_weight(w, spec)
    qt = quantize_weight(w, spec)
    _assert_codes_equal(qt.codes, codes, what)
    _assert_qparams_equal(qt.scale, qt.zero_point, scale, zero, what)
    assert torch.equal(qt.dequantize(), deq), what
    assert torch.equal(fake_quant(w, spec), fake.to(w.dtype)), what


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("gran", ["tensor", "channel", "group"])
def test_int_weights_match_compressed_tensors(gran, symmetric):
    for dtype in DTYPES:
        for kind in KINDS:
            w = _weight(kind, dtype)
            for bits in BITS:
                _check_weight(w, _spec(gran, bits, symmetric), f"{dtype} {kind} w{bits}")
            _check_weight(w, _spec(gran, 4, symmetric, clip=0.85), f"{dtype} {kind} w4 clip 0.85")


@pytest.mark.parametrize("gran", ["tensor", "channel", "group"])
def test_fp8_weights_match_compressed_tensors(gran):
    for dtype in DTYPES:
        for kind in KINDS:
            _check_weight(_weight(kind, dtype), _spec(gran, fmt="fp8"), f"{dtype} {kind} fp8")


def _check_dynamic(x: torch.Tensor, spec: QuantSpec, what: str) -> None:
    """compressed-tensors' dynamic activation path (what its quantized forward runs) vs ours."""
    args = _args(spec, dynamic=True)
    scale, zero = compute_dynamic_scales_and_zp(value=x, args=args, module=None)
    ref_codes = ct.quantize(x, scale, zero, args, dtype=FP8_DTYPE if spec.format == "fp8" else torch.int8)
    xb = blocks(x, spec.granularity, spec.group_size)  # [R, G, B]
    s, z = qparams_from_range(*block_range(xb, spec), spec)  # [R, G, 1]
    q = quantize(xb, s, z, spec)
    codes = (q if spec.format == "fp8" else q.to(torch.int8)).reshape(x.shape)
    _assert_codes_equal(codes, ref_codes, what)
    _assert_qparams_equal(s.reshape(scale.shape), z.reshape(zero.shape), scale, zero, what)
    assert torch.equal(fake_quant(x, spec), ct.fake_quantize(x, scale, zero, args).to(x.dtype)), what


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("gran", ["tensor", "token", "group"])
def test_dynamic_int_activations_match_compressed_tensors(gran, symmetric):
    for dtype in DTYPES:
        for kind in KINDS:
            x = _activation(kind, dtype)
            for bits in BITS:
                _check_dynamic(x, _spec(gran, bits, symmetric), f"{dtype} {kind} a{bits}")


@pytest.mark.parametrize("gran", ["tensor", "token"])
def test_dynamic_fp8_activations_match_compressed_tensors(gran):
    for dtype in DTYPES:
        for kind in KINDS:
            _check_dynamic(_activation(kind, dtype), _spec(gran, fmt="fp8"), f"{dtype} {kind} fp8")


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("gran", ["tensor", "group"])
def test_static_activations_match_compressed_tensors(gran, symmetric):
    """Static: (scale, zero) from given calibration min/max; inputs beyond that range are clamped."""
    for dtype in DTYPES:
        calib = _activation("outliers", dtype)
        x = 2.0 * _activation("random", dtype)
        if gran == "tensor":
            lo, hi = calib.amin().reshape(1), calib.amax().reshape(1)
        else:
            g = calib.unflatten(-1, (-1, GS))  # [B, T, groups, GS]
            lo, hi = g.amin(dim=(0, 1, 3)).reshape(1, -1), g.amax(dim=(0, 1, 3)).reshape(1, -1)  # [1, groups]
        for bits in (4, 8):
            spec = _spec(gran, bits, symmetric)
            args = _args(spec, dynamic=False)
            ref_s, ref_z = calculate_qparams(lo, hi, args)
            s, z = qparams_from_range(lo.reshape(1, -1, 1), hi.reshape(1, -1, 1), spec)  # [1, G, 1]
            _assert_qparams_equal(s.reshape(ref_s.shape), z.reshape(ref_z.shape), ref_s, ref_z, f"{dtype} {bits}")
            assert torch.equal(fake_quant(x, spec, s, z), ct.fake_quantize(x, ref_s, ref_z, args).to(dtype))


def test_fused_symmetric_path_is_the_general_path():
    """The fused dynamic symmetric fake-quant equals quantize + dequantize bit for bit (clip too)."""
    for dtype in DTYPES:
        for kind in KINDS:
            x = _activation(kind, dtype)
            for gran in ("tensor", "token", "group"):
                for bits in BITS:
                    for clip in (1.0, 0.8):
                        spec = _spec(gran, bits, clip=clip)
                        xb = blocks(x, gran, spec.group_size)
                        s, z = qparams_from_range(*block_range(xb, spec), spec)
                        general = dequantize(quantize(xb, s, z, spec), s, z, dtype)
                        assert torch.equal(_fake_quant_sym(xb.clone(), spec), general), (dtype, kind, gran, bits, clip)


def test_fp8_asymmetric_is_rejected():
    with pytest.raises(QuantbenchError, match="symmetric"):
        fake_quant(torch.randn(4, 64), QuantSpec(format="fp8", symmetric=False, granularity="channel"))


# ---- torchao ------------------------------------------------------------------------------------

def _block_size(gran: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """torchao's block_size for our granularity on a tensor of `shape`."""
    if gran == "tensor":
        return shape
    if gran in ("channel", "token"):
        return (*([1] * (len(shape) - 1)), shape[-1])
    return (*([1] * (len(shape) - 1)), GS)


def _near_tie(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Elements whose exact x / scale + zero lies within 1e-4 of a half-integer (blocked [R, G, B])."""
    v = x.double() / scale.double() + zero.double()
    return ((v - v.floor()) - 0.5).abs() < 1e-4


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("gran", ["tensor", "channel", "group", "token"])
def test_torchao_affine_matches_except_documented_differences(gran, symmetric):
    """choose_qparams_affine / quantize_affine with the same signed range: same scales and zero
    points; same codes except (a) torchao multiplies by 1/scale where compressed-tensors divides,
    which moves near-ties only (a symmetric block's -absmax element sits at -(qmax + 0.5) up to the
    scale's rounding, so it is one), and (b) all-zero blocks: torchao clamps the scale to
    smallest_normal with zero point qmin, compressed-tensors sets eps with zero point 0."""
    import torchao.quantization.quant_primitives as qp
    mapping = qp.MappingType.SYMMETRIC if symmetric else qp.MappingType.ASYMMETRIC
    for kind in ("random", "outliers"):
        t = _activation(kind, torch.float32) if gran == "token" else _weight(kind, torch.float32)
        bs = _block_size(gran, tuple(t.shape))
        for bits in BITS:
            qmin, qmax = int_range(bits)
            spec = _spec(gran, bits, symmetric)
            s_ao, z_ao = qp.choose_qparams_affine(t, mapping, bs, torch.int8, qmin, qmax, zero_point_dtype=torch.int8)
            q_ao = qp.quantize_affine(t, bs, s_ao, z_ao, torch.int8, qmin, qmax)
            xb = blocks(t, gran, spec.group_size)  # [R, G, B]
            s, z = qparams_from_range(*block_range(xb, spec), spec)  # [R, G, 1]
            q = quantize(xb, s, z, spec).to(torch.int8)
            s_ao, z_ao, q_ao = s_ao.reshape(s.shape), z_ao.reshape(z.shape), q_ao.reshape(q.shape)
            zero_block = (xb == 0).all(-1, keepdim=True)  # [R, G, 1]
            torch.testing.assert_close(s[~zero_block], s_ao[~zero_block], rtol=1e-6, atol=0)
            assert torch.equal(z[~zero_block], z_ao[~zero_block])
            assert (s[zero_block] == torch.finfo(torch.float32).eps).all()
            assert (s_ao[zero_block] == torch.finfo(torch.float32).smallest_normal).all()
            assert (z[zero_block] == 0).all() and (z_ao[zero_block] == (0 if symmetric else qmin)).all()
            live = ~zero_block.expand_as(xb)
            tie = _near_tie(xb, s, z) & live
            assert torch.equal(q[live & ~tie], q_ao[live & ~tie]), (kind, bits)
            assert ((q[tie].int() - q_ao[tie].int()).abs() <= 1).all()
            if symmetric:  # a block's extremes sit at +-(qmax + 0.5) up to the scale's rounding
                amax = xb.abs().amax(-1, keepdim=True)
                assert (q[(xb == amax) & live] == qmax).all()
                assert ((q[(xb == -amax) & live] - qmin).abs() <= 1).all()
            assert (dequantize(q, s, z, torch.float32)[~live] == 0).all()
            deq_ao = qp.dequantize_affine(q_ao, (1, 1, xb.shape[-1]), s_ao, z_ao, torch.int8, qmin, qmax)
            assert (deq_ao[~live] == 0).all()  # both represent an all-zero block exactly


def test_torchao_float8_matches_except_all_zero_blocks():
    """torchao's float8 primitives: same scales (absmax / 448) and the same e4m3 codes; an all-zero
    block gets scale 0 and NaN codes there, eps and 0 here."""
    import torchao.quantization.quant_primitives as qp
    for gran in ("tensor", "channel", "group"):
        w = _weight("outliers", torch.float32)
        s_ao = qp._choose_scale_float8(w, list(_block_size(gran, tuple(w.shape))))
        q_ao = qp._quantize_affine_float8(w, s_ao)
        qt = quantize_weight(w, _spec(gran, fmt="fp8"))
        live = s_ao.reshape(qt.scale.shape) != 0
        torch.testing.assert_close(qt.scale[live], s_ao.reshape(qt.scale.shape)[live], rtol=1e-6, atol=0)
        assert (qt.scale[~live] == torch.finfo(torch.float32).eps).all()
        rows = blocks(q_ao.float(), gran, qt.spec.group_size)  # [R, G, B]
        ours = blocks(qt.codes.float(), gran, qt.spec.group_size)
        keep = live.reshape(rows.shape[0], rows.shape[1], 1).expand_as(rows)
        assert torch.equal(ours[keep], rows[keep])
        assert torch.isnan(rows[~keep]).all() and (ours[~keep] == 0).all()
