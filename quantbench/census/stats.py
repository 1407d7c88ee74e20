"""Streaming statistics for one activation site (a decoder layer's output or a linear layer's input).

Each batch is reduced to a few numbers as it is produced: running top-k, a log-magnitude
histogram (for the median), raw moments (for kurtosis), a per-dimension running extreme and the
sparse list of elements above the absolute floor. Memory per site is O(dims + bins + records),
independent of the number of tokens.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

LOG_LO, LOG_HI, N_BINS = -8.0, 7.0, 600  # log10 |x| histogram: 0.025 decades (~6%) per bin
SAMPLE = 1 << 14  # elements per batch that feed the median histogram


@dataclass
class Record:
    value: float  # |x|
    dim: int
    seq: int  # sequence index in the census batches
    pos: int  # token position in the sequence


@dataclass
class SiteStats:
    """Running statistics of one [B, T, D] activation stream."""

    dims: int
    top_k: int
    floor: float  # elements with |x| above it are kept as records (activation-outlier candidates)
    max_records: int
    keep_records: bool = True
    n: int = 0
    sum2: float = 0.0  # sum of x^2
    sum4: float = 0.0  # sum of x^4
    hist: torch.Tensor = field(default_factory=lambda: torch.zeros(N_BINS, dtype=torch.float64))
    top: list[Record] = field(default_factory=list)
    records: list[Record] = field(default_factory=list)
    extreme: torch.Tensor | None = None  # [D] signed value at the running max |x| of each dim

    @torch.no_grad()
    def update(self, x: torch.Tensor, seq0: int) -> None:
        """x [B, T, D] (any float dtype); seq0: census index of x's first sequence."""
        b, t, d = x.shape
        self.update_rows(x.reshape(-1, d), t, seq0)

    @torch.no_grad()
    def update_rows(self, x: torch.Tensor, t: int, seq0: int, flat: torch.Tensor | None = None) -> None:
        """x [N, D] rows; row r is token flat[r] of the batch (flat index b * T + pos; default r), T = t.
        Fused reductions only (no |x| copy of the whole tensor): min/max per dim and two dot products."""
        rows = x.detach().float()  # [N, D]
        d = rows.shape[-1]
        self.n += rows.numel()
        flat_x = rows.reshape(-1)  # [N*D]
        sq = flat_x.square()  # [N*D]; dot products are the fastest reductions on CPU
        self.sum2 += float(torch.dot(flat_x, flat_x))
        self.sum4 += float(torch.dot(sq, sq))
        sample = flat_x[:: _stride(flat_x.numel(), d)].abs()
        logs = sample[sample > 0].clamp_min(10 ** LOG_LO).log10()  # exact zeros (ReLU) do not set the median
        self.hist += torch.histc(logs, N_BINS, LOG_LO, LOG_HI).double()
        lo, hi = rows.amin(0), rows.amax(0)  # [D], [D] (two reductions beat aminmax(dim) on CPU)
        signed = torch.where(hi >= -lo, hi, lo)  # [D] value of the largest |x| per dim
        self.extreme = signed if self.extreme is None else torch.where(
            signed.abs() > self.extreme.abs(), signed, self.extreme)
        tok_of = (lambda r: r) if flat is None else (lambda r, f=flat.tolist(): f[r])  # noqa: E731
        self.top = _merge(self.top, _top_elements(rows, signed.abs(), self.top_k, t, seq0, tok_of), self.top_k)
        if self.keep_records:
            dims = (signed.abs() > self.floor).nonzero().squeeze(1)  # only dims that reach the floor
            if dims.numel():
                sub = rows[:, dims].abs()  # [N, n_dims]
                tok, j = (sub > self.floor).nonzero().unbind(1)
                recs = [Record(v, dd, seq0 + tok_of(tt) // t, tok_of(tt) % t)
                        for v, tt, dd in zip(sub[tok, j].tolist(), tok.tolist(), dims[j].tolist())]
                self.records = _merge(self.records, recs, self.max_records)

    @property
    def absmax(self) -> torch.Tensor:
        """[D] running max |x| per dimension."""
        return self.extreme.abs() if self.extreme is not None else torch.zeros(self.dims)

    def median(self) -> float:
        """Median of the nonzero |x| from the log histogram (geometric bin centre, ~3% resolution)."""
        total = float(self.hist.sum())
        if total == 0:
            return 0.0
        i = int(torch.searchsorted(self.hist.cumsum(0), torch.tensor(total / 2, dtype=torch.float64)))
        i = min(i, N_BINS - 1)
        return 10 ** (LOG_LO + (i + 0.5) * (LOG_HI - LOG_LO) / N_BINS)

    def kurtosis(self) -> float:
        """Kurtosis about zero, E[x^4] / E[x^2]^2, over every element seen (3 for a centred Gaussian)."""
        m2, m4 = self.sum2 / max(self.n, 1), self.sum4 / max(self.n, 1)
        return m4 / (m2 * m2) if m2 > 0 else float("nan")


def _stride(numel: int, d: int) -> int:
    """Sampling stride ~numel / SAMPLE, coprime with the row width so every dim gets sampled."""
    step = max(1, numel // SAMPLE)
    while math.gcd(step, d) != 1:
        step += 1
    return step


def _top_elements(rows: torch.Tensor, extreme: torch.Tensor, k: int, t: int, seq0: int,
                  tok_of=lambda r: r) -> list[Record]:
    """Top-k |x| elements of rows [N, D], given this batch's max |x| per dim extreme [D]: the k dims
    with the largest max hold all of them, so only those k columns are searched. tok_of: row -> flat token."""
    dims = extreme.topk(min(k, extreme.numel())).indices  # [k]
    sub = rows[:, dims].abs()  # [B*T, k]
    vals, idx = sub.reshape(-1).topk(min(k, sub.numel()))
    tok, dim = idx // dims.numel(), dims[idx % dims.numel()]
    return [Record(v, dd, seq0 + tok_of(tt) // t, tok_of(tt) % t)
            for v, tt, dd in zip(vals.tolist(), tok.tolist(), dim.tolist())]


def _merge(old: list[Record], new: list[Record], cap: int) -> list[Record]:
    both = old + new
    if len(both) > cap:
        both = sorted(both, key=lambda r: r.value, reverse=True)[:cap]
    return both


def finite(x: float) -> float | None:
    """JSON-safe float (None for nan/inf)."""
    return x if math.isfinite(x) else None
