"""Orthogonal matrices for rotations: (randomized) Hadamard of any order we can build, else random orthogonal.

Hadamard orders are built as Kronecker products of Sylvester matrices (powers of 2) and Paley-I
matrices of order p + 1 (p prime, p = 3 mod 4: orders 4, 8, 12, 20, 24, 32, 44, 48, ...). A
Kronecker product of Hadamard matrices is Hadamard, so e.g. 576 = 12 x 12 x 4 and
1536 = 12 x 128 are exact Hadamard orders (the default model's hidden and intermediate sizes).
Orders we cannot build this way fall back to a random orthogonal matrix (QR of a Gaussian),
which spreads outliers just as well but costs a dense matmul when applied online.
"""
from __future__ import annotations

import torch


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, int(n**0.5) + 1))


def sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)  # [2k, 2k]
    return h


def paley(p: int) -> torch.Tensor:
    """Paley construction I: a Hadamard matrix of order p + 1 (p prime, p % 4 == 3)."""
    residues = {(i * i) % p for i in range(1, p)}
    chi = torch.tensor([0] + [1 if i in residues else -1 for i in range(1, p)], dtype=torch.float64)
    idx = torch.arange(p)
    q = chi[(idx[None, :] - idx[:, None]) % p]  # [p, p] Jacobsthal matrix, q[i, j] = chi(j - i)
    s = torch.zeros(p + 1, p + 1, dtype=torch.float64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, q
    return s + torch.eye(p + 1, dtype=torch.float64)


def hadamard_factors(n: int) -> list[int] | None:
    """Factor n into Paley orders (p + 1) and a trailing power of 2, or None."""
    if n & (n - 1) == 0:
        return [n]
    for p in range(3, n, 4):
        m = p + 1
        if _is_prime(p) and n % m == 0 and m & (m - 1) != 0:
            rest = hadamard_factors(n // m)
            if rest is not None:
                return [m, *rest]
    return None


def hadamard(n: int) -> torch.Tensor | None:
    """An unnormalized n x n Hadamard matrix (entries +-1, H H^T = n I), or None if we cannot build one."""
    factors = hadamard_factors(n)
    if factors is None:
        return None
    h = torch.ones(1, 1, dtype=torch.float64)
    for m in factors:
        h = torch.kron(h, sylvester(m) if m & (m - 1) == 0 else paley(m - 1))
    return h


def random_orthogonal(n: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :]  # Haar-distributed
