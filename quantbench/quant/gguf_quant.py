"""llama.cpp weight types through the `gguf` package's own quantizers (bit-exact by construction).

A GGUF quantized weight [out, in] is stored row by row in blocks of `block` consecutive input
elements; each block carries its own scale (and min / exponent). We never re-implement the block
math: `gguf_quantize` calls `gguf.quants.quantize` and `gguf_fake_quant` returns
`gguf.quants.dequantize(gguf.quants.quantize(w))`, which is exactly what llama.cpp's Python tools
write and what transformers' GGUF loader (legacy path, used for llama/qwen2) reads back.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from ..core.errors import QuantbenchError

FLOAT_TYPES = ("F32", "F16", "BF16")  # stored as values, not blocks
TERNARY_TYPES = ("TQ1_0", "TQ2_0")  # BitNet-style {-1, 0, 1}·d: only for models trained ternary


def _qtype_enum(qtype: str):
    from gguf import GGMLQuantizationType

    try:
        return GGMLQuantizationType[qtype.upper()]
    except KeyError:
        raise QuantbenchError(f"unknown GGUF type {qtype!r}; quantizable here: {', '.join(quantizable_types())}") from None


@lru_cache(maxsize=None)
def _package_can_quantize(qtype: str) -> bool:
    """Whether the installed gguf package implements quantize AND dequantize for `qtype` (probed on zeros)."""
    from gguf import GGML_QUANT_SIZES, quants

    t = _qtype_enum(qtype)
    block = GGML_QUANT_SIZES[t][0]
    try:
        quants.dequantize(quants.quantize(np.zeros((1, block), np.float32), t), t)
    except (RuntimeError, quants.QuantError):  # RuntimeError covers the package's not-implemented types
        return False
    return True


@lru_cache(maxsize=1)
def quantizable_types() -> tuple[str, ...]:
    """Every GGML type the installed gguf package can both quantize and dequantize (floats included).

    gguf 0.19.0: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, TQ1_0, TQ2_0, MXFP4. It cannot quantize
    the k-quants (Q2_K..Q6_K, Q8_K), the i-quants (IQ*), Q8_1, NVFP4 or Q1_0 (dequantize only or neither).
    """
    from gguf import GGMLQuantizationType

    return tuple(t.name for t in GGMLQuantizationType if _package_can_quantize(t.name))


def block_types() -> tuple[str, ...]:
    """The quantizable block types (no floats): candidates for a `gguf` backend's recipes."""
    return tuple(t for t in quantizable_types() if t not in FLOAT_TYPES)


def check_qtype(qtype: str) -> str:
    """Canonical (upper-case) name of a type the package can quantize, or a one-line QuantbenchError."""
    name = _qtype_enum(qtype).name
    if not _package_can_quantize(name):
        raise QuantbenchError(f"the installed gguf package cannot quantize {name}; "
                              f"quantizable: {', '.join(quantizable_types())}")
    return name


def block_size(qtype: str) -> int:
    from gguf import GGML_QUANT_SIZES

    return GGML_QUANT_SIZES[_qtype_enum(qtype)][0]


def bits_per_weight(qtype: str) -> float:
    """Storage bits per weight from the package's GGML_QUANT_SIZES (block bytes * 8 / block elements).

    Q8_0 8.5, Q5_1 6.0, Q5_0 5.5, Q4_1 5.0, Q4_0 4.5, MXFP4 4.25, F16/BF16 16, F32 32.
    """
    from gguf import GGML_QUANT_SIZES

    block, type_size = GGML_QUANT_SIZES[_qtype_enum(qtype)]
    return 8.0 * type_size / block


def _as_fp32_rows(w: torch.Tensor, qtype: str, name: str) -> np.ndarray:
    """w (any float dtype, any device) as a C-contiguous fp32 numpy array; checks the row length."""
    if w.ndim == 0:
        raise QuantbenchError(f"{name}: cannot store a scalar as a GGUF {qtype} tensor")
    n = w.shape[-1]
    bs = block_size(qtype)
    if n % bs:
        raise QuantbenchError(f"{name}: row length {n} is not a multiple of the GGUF {qtype} block size {bs}")
    # fp16/bf16 -> fp32 is exact; llama.cpp's converter also quantizes from fp32
    return np.ascontiguousarray(w.detach().to("cpu", torch.float32).numpy())


def gguf_quantize(w: torch.Tensor, qtype: str, name: str = "weight") -> np.ndarray:
    """The bytes llama.cpp stores for `w` as `qtype`: uint8 [..., in/block*type_size] for block types
    and BF16, float16 / float32 values for F16 / F32 (what `gguf.quants.quantize` returns)."""
    from gguf import quants

    qtype = check_qtype(qtype)
    return quants.quantize(_as_fp32_rows(w, qtype, name), _qtype_enum(qtype))


def gguf_dequantize(data: np.ndarray, qtype: str) -> np.ndarray:
    """fp32 values of stored GGUF data (`gguf.quants.dequantize`)."""
    from gguf import quants

    return quants.dequantize(data, _qtype_enum(check_qtype(qtype)))


def gguf_fake_quant(w: torch.Tensor, qtype: str, name: str = "weight") -> torch.Tensor:
    """dequantize(quantize(w)) through the gguf package, back on w's device and in w's dtype.

    The dequantized values are exact in fp32; a bf16/fp16 model rounds them on the way back (the
    runtime's rounding, not the format's), so simulate in fp32 when bit-exactness matters.
    """
    deq = gguf_dequantize(gguf_quantize(w, qtype, name), qtype)  # fp32, same shape as w
    return torch.from_numpy(np.ascontiguousarray(deq)).reshape(w.shape).to(device=w.device, dtype=w.dtype)


def stored_nbytes(shape: tuple[int, ...], qtype: str) -> int:
    """Bytes a tensor of `shape` takes in a GGUF file as `qtype` (before alignment padding)."""
    from gguf import GGML_QUANT_SIZES

    block, type_size = GGML_QUANT_SIZES[_qtype_enum(qtype)]
    numel = int(np.prod(shape))
    return numel // block * type_size
