"""GPTQ against an independent transcription of the reference loop.

`reference_fasterquant` below is written from IST-DASLab/gptq `GPTQ.fasterquant` (gptq.py; the same
loop is in AutoGPTQ's `auto_gptq/quantization/gptq.py`, whose `static_groups` variant is the one we
offer with act_order). It keeps the reference's structure line for line: the per-channel quantizer
fitted on W before dead columns are zeroed, dead columns (diag H == 0), static groups fitted after
that, act-order permutation by descending diag H, damping percdamp * mean(diag H), Cholesky ->
cholesky_inverse -> upper Cholesky, blocks of `blocksize` columns held in a copy W1 with the
in-block updates, the block's error pushed onto W[:, i2:] at its end, and (without static groups)
a group's quantizer fitted at the group's first column on W -- the matrix as updated through the
previous blocks only, which is what the reference reads (not W1).

Only the per-column quantizer is ours (quantbench.quant.primitives: the compressed-tensors grid
that every other part of the project uses), so the comparison is about the algorithm.

One intended difference, passed explicitly: the reference factors H in its own dtype (fp32); we
factor in float64 (H is accumulated in float64) and run the column loop in float32. The
transcription takes the factorisation dtype as a parameter and is run in float64 for the exact
comparison. The Hessian scale also differs (reference: 2/n XᵀX as a running mean; ours XᵀX): GPTQ
is invariant to a constant factor in exact arithmetic (damping is relative to mean diag H); both
functions get the same H here, and the accumulation itself is checked separately.
"""
from __future__ import annotations

import math
import zlib

import pytest
import torch

from quantbench.quant.calibration import StatsRequest, collect_input_stats
from quantbench.quant.mitigations.gptq import gptq_quantize
from quantbench.quant.primitives import dequantize, qparams_from_range, quantize
from quantbench.quant.spec import QuantSpec

# ---- the reference, transcribed (the quantizer calls are ours) ----------------------------------

def _find_params(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantizer.find_params(x, weight=True): one (scale, zero) per row of x [rows, cols] (per
    channel), or one for all of x (per tensor); the range and formulas are our grid's."""
    if spec.granularity == "tensor":
        lo, hi = x.min().reshape(1, 1), x.max().reshape(1, 1)  # [1, 1], broadcast over rows
    else:
        lo, hi = x.min(1, keepdim=True)[0], x.max(1, keepdim=True)[0]  # [rows, 1]
    return qparams_from_range(lo, hi, spec)


def _quant(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """quantize(w.unsqueeze(1), scale, zero, maxq).flatten(): fake-quantize one column [rows]."""
    x = w.unsqueeze(1)  # [rows, 1]
    return dequantize(quantize(x, scale, zero, spec), scale, zero, torch.float32).flatten()


def reference_fasterquant(W: torch.Tensor, H: torch.Tensor, spec: QuantSpec, blocksize: int = 128,
                          percdamp: float = 0.01, actorder: bool = False, static_groups: bool = False,
                          factor_dtype: torch.dtype = torch.float64):
    """-> (Q [rows, columns] dequantized, scales: one [rows, 1] tensor per group (or one in all))."""
    groupsize = spec.group_size if spec.granularity == "group" else -1
    col_spec = spec.model_copy(update={"granularity": "channel", "group_size": None}) if groupsize != -1 else spec
    W = W.clone().float()
    H = H.clone().to(factor_dtype)
    columns = W.shape[1]

    scale, zero = _find_params(W, col_spec)  # `if not self.quantizer.ready(): find_params(W)`
    scales = [scale]

    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    if static_groups:
        groups = []
        for i in range(0, columns, groupsize):
            groups.append(_find_params(W[:, i:(i + groupsize)], col_spec))
        scales = [s for s, _ in groups]

    if actorder:
        perm = torch.argsort(torch.diag(H), descending=True)
        W = W[:, perm]
        H = H[perm][:, perm]
        invperm = torch.argsort(perm)

    Q = torch.zeros_like(W)

    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(columns)
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    H = torch.linalg.cholesky(H, upper=True)
    Hinv = H.float()  # the loop runs in W's dtype (float32)

    if groupsize != -1 and not static_groups:
        scales = []
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1

        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]

        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]

            if groupsize != -1:
                if not static_groups:
                    if (i1 + i) % groupsize == 0:
                        scale, zero = _find_params(W[:, (i1 + i):(i1 + i + groupsize)], col_spec)
                        scales.append(scale)
                else:
                    idx = i1 + i
                    if actorder:
                        idx = perm[idx]
                    scale, zero = groups[idx // groupsize]

            q = _quant(w, scale, zero, spec)
            Q1[:, i] = q

            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1

        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])

    if actorder:
        Q = Q[:, invperm]
    return Q, scales


# ---- data ----------------------------------------------------------------------------------------

def _layer(seed: int, n_in: int = 192, n_out: int = 48, dead: tuple[int, ...] = (5, 77)):
    """W [out, in] and H = XᵀX (float64) of uneven inputs with an outlier channel and dead channels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(384, n_in, generator=g) * (torch.rand(n_in, generator=g) * 3 + 0.1)  # [N, in]
    x[:, 11] *= 25.0
    x[:, list(dead)] = 0.0  # never-active inputs: diag H == 0
    w = torch.randn(n_out, n_in, generator=g) * 0.05
    w[3, 40] = 0.8  # an outlier weight
    return w, (x.T @ x).double()


def _spec(bits: int, gran: str, sym: bool, g: int | None = None) -> QuantSpec:
    return QuantSpec(bits=bits, granularity=gran, group_size=g, symmetric=sym)


CASES = [  # (spec, blocksize, act_order, static_groups)
    (_spec(4, "channel", True), 128, False, False),
    (_spec(4, "channel", False), 128, False, False),
    (_spec(3, "channel", True), 64, True, False),
    (_spec(8, "channel", False), 128, True, False),
    (_spec(2, "channel", False), 128, False, False),
    (_spec(4, "tensor", True), 128, False, False),
    (_spec(4, "group", True, 32), 128, False, False),  # groups start inside blocks (stale-W fit)
    (_spec(4, "group", False, 48), 128, False, False),  # a group straddles two blocks
    (_spec(3, "group", True, 64), 16, False, False),  # blocks smaller than groups
    (_spec(8, "group", False, 32), 128, False, False),
    (_spec(4, "group", True, 32), 128, True, True),  # act_order: static groups (AutoGPTQ)
    (_spec(2, "group", False, 64), 96, True, True),
    (_spec(4, "group", False, 48), 128, False, True),  # static groups without act_order
]


def _id(case) -> str:
    s, b, ao, st = case
    return f"{s.bits}b-{s.granularity}{s.group_size or ''}-{'sym' if s.symmetric else 'asym'}-b{b}" \
           f"{'-actorder' if ao else ''}{'-static' if st else ''}"


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_gptq_equals_the_reference_loop(case):
    spec, block, act_order, static = case
    w, h = _layer(zlib.crc32(_id(case).encode()) % 1000)
    ref_q, ref_scales = reference_fasterquant(w, h, spec, blocksize=block, actorder=act_order, static_groups=static)
    qt = gptq_quantize(w, h, spec, damp=0.01, block=block, act_order=act_order, static_groups=static)
    got = qt.dequantize(torch.float32)
    per_row = [torch.equal(got[r], ref_q[r]) for r in range(w.shape[0])]
    assert all(per_row), f"{per_row.count(False)} of {len(per_row)} output channels differ"
    ref_scale = torch.cat(ref_scales, 1)  # [out, G], [out, 1] (channel) or [1, 1] (tensor)
    assert torch.equal(qt.scale.reshape(ref_scale.shape), ref_scale)


def test_the_transcription_is_not_rtn():
    """Sanity of the comparison itself: the reference loop moves weights away from round-to-nearest."""
    spec = _spec(4, "channel", True)
    w, h = _layer(3)
    ref_q, _ = reference_fasterquant(w, h, spec)
    s, z = _find_params(w, spec)
    rtn = torch.stack([_quant(w[:, j], s, z, spec) for j in range(w.shape[1])], 1)
    live = torch.diag(h) > 0
    assert (ref_q[:, live] != rtn[:, live]).float().mean() > 0.05


def test_hessian_is_the_reference_accumulation_up_to_its_constant():
    """Reference add_batch: H <- H n/(n+m) + (2/(n+m)) XᵀX over batches (a running mean of 2 XᵀX);
    ours accumulates XᵀX in float64. Same matrix up to the factor 2/n_samples."""

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(16, 8)

        def forward(self, input_ids):
            return self.lin(input_ids)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 10, 16, generator=g)  # 6 sequences of 10 tokens
    m = Wrap()
    ours = collect_input_stats(m, {"lin": m.lin}, x, 2, torch.device("cpu"), StatsRequest(gram=True))["lin"].gram
    H, nsamples = torch.zeros(16, 16), 0
    for b in range(0, 6, 2):  # add_batch per forward call of 2 sequences
        inp = x[b:b + 2]
        tmp = inp.shape[0]
        inp = inp.reshape(-1, 16).t()
        H *= nsamples / (nsamples + tmp)
        nsamples += tmp
        inp = math.sqrt(2 / nsamples) * inp.float()
        H += inp.matmul(inp.t())
    torch.testing.assert_close(ours.float() * 2 / nsamples, H, rtol=1e-5, atol=1e-6)
