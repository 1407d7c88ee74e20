"""Rotation of the residual stream and of down_proj's input (QuaRot / SpinQuant style, no training).

Steps (each leaves the FP function unchanged up to float rounding; declared in the Effects:
untied lm_head as an added parameter, the residual basis Q, the online transforms):
1. Untie lm_head from the embeddings (the default model ties them) so each can be rotated alone.
2. Fuse RMSNorm weights into the linears they feed (q/k/v, gate/up, lm_head); norms become
   weightless. RMSNorm commutes with an orthogonal Q because ||hQ|| = ||h||. LayerNorm families
   (mean subtraction, bias) are rejected with a clear error.
3. Residual rotation h' = h Q: embeddings E <- E Q; residual readers W <- W Q;
   residual writers (o, down) W <- Q^T W, b <- Q^T b.
4. Online rotation of down_proj's input: W <- W H and x -> x H before down_proj, declared in the
   Effects as an online transform (a forward pre-hook; backends re-attach it to the module they
   create). H is applied as a Kronecker product of small factors (cheap).
5. Per-head rotation of V and of o_proj's input (offline, exact: attention mixes V linearly per head).

Options:
  kind: "hadamard" (default; randomized Hadamard, exact order via Sylvester x Paley factors, e.g.
        576 = 12 x 12 x 4; random orthogonal when no Hadamard of that order is built) or "random".
  down: rotate down_proj's input online (default true). heads: rotate V/o per head (default true).
  seed: random signs / random matrices (default 0).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
from pydantic import Field

from ...arch import arch_of, get_module
from ...errors import QuantbenchError
from ...surgery import attach_online, get_weight, is_linear, scale_in, set_weight
from ..effects import Effects
from ..plugin import Mitigation, Options, QuantContext
from ..spec import MITIGATIONS
from ._hadamard import hadamard_factors, paley, random_orthogonal, sylvester


class KronRotation(nn.Module):
    """x -> x Q with Q = diag(signs) (F_1 kron F_2 kron ...) / sqrt(n), or a dense Q (factors = [Q])."""

    def __init__(self, factors: list[torch.Tensor], signs: torch.Tensor | None, norm: float):
        super().__init__()
        self.dims = [f.shape[0] for f in factors]
        for i, f in enumerate(factors):
            self.register_buffer(f"f{i}", f.double())  # cast per call; fp64 keeps matrix() exact
        self.register_buffer("signs", signs.double() if signs is not None else None)
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = x * self.signs.to(x.dtype) if self.signs is not None else x
        y = y.reshape(*lead, *self.dims)  # [..., n] -> [..., d1, d2, ...]
        k = len(self.dims)
        for i in range(k):
            f = getattr(self, f"f{i}").to(x.dtype)
            y = torch.movedim(torch.movedim(y, len(lead) + i, -1) @ f, -1, len(lead) + i)  # axis i times F_i
        return y.reshape(*lead, -1) / self.norm  # [..., n]

    def matrix(self) -> torch.Tensor:
        """The dense Q (float64), for folding into weights."""
        n = 1
        for d in self.dims:
            n *= d
        return self.forward(torch.eye(n, dtype=torch.float64))


def make_rotation(n: int, kind: str, gen: torch.Generator) -> tuple[KronRotation, str]:
    factors = hadamard_factors(n) if kind == "hadamard" else None
    if kind not in ("hadamard", "random"):
        raise QuantbenchError(f"rotate: kind must be 'hadamard' or 'random', got {kind!r}")
    if factors is None:
        return KronRotation([random_orthogonal(n, gen)], None, 1.0), "random"
    mats = [sylvester(m) if m & (m - 1) == 0 else paley(m - 1) for m in factors]
    signs = torch.randint(0, 2, (n,), generator=gen).double() * 2 - 1
    return KronRotation(mats, signs, n**0.5), "hadamard"


def untie(model: nn.Module, arch) -> bool:
    emb, head = get_module(model, arch.embed), get_module(model, arch.lm_head)
    if head.weight is not emb.weight and head.weight.data_ptr() != emb.weight.data_ptr():
        return False
    head.weight = nn.Parameter(emb.weight.data.clone(), requires_grad=False)
    model.config.tie_word_embeddings = False
    return True


@torch.no_grad()
def fuse_norms(model: nn.Module, arch) -> None:
    """RMSNorm weight g folded into the following linears' input columns; g <- 1."""
    if arch.norm_kind != "rms":
        raise QuantbenchError(f"rotate: {model.config.model_type} uses LayerNorm (mean subtraction, bias); "
                              "norm fusing and rotation support RMSNorm families (llama, mistral, qwen2/3) only")
    for layer in get_module(model, arch.layers):
        for norm_path, readers in ((arch.attn_norm, arch.qkv), (arch.mlp_norm, arch.up)):
            norm = get_module(layer, norm_path)
            for r in readers:
                scale_in(get_module(layer, r), norm.weight.data.float())
            norm.weight.data.fill_(1.0)
    norm = get_module(model, arch.final_norm)
    scale_in(get_module(model, arch.lm_head), norm.weight.data.float())
    norm.weight.data.fill_(1.0)


def _rot_in(mod: nn.Module, q: torch.Tensor) -> None:
    set_weight(mod, (get_weight(mod).double() @ q).float())  # W [out, in] <- W Q


def _rot_out(mod: nn.Module, q: torch.Tensor) -> None:
    set_weight(mod, (q.T @ get_weight(mod).double()).float())  # W <- Q^T W
    if getattr(mod, "bias", None) is not None:
        mod.bias.data.copy_((q.T @ mod.bias.data.double()).to(mod.bias.dtype))


@torch.no_grad()
def _rotate_heads(layer: nn.Module, arch, hq: torch.Tensor, hd: int) -> None:
    """V rows and o_proj input columns rotated per head by the same hq [hd, hd]."""
    v, o = get_module(layer, arch.qkv[-1]), get_module(layer, arch.o)
    nv, no = v.weight.shape[0] // hd, o.weight.shape[1] // hd
    set_weight(v, (torch.block_diag(*[hq] * nv).T @ get_weight(v).double()).float())
    if v.bias is not None:
        v.bias.data.copy_((torch.block_diag(*[hq] * nv).T @ v.bias.data.double()).to(v.bias.dtype))
    set_weight(o, (get_weight(o).double() @ torch.block_diag(*[hq] * no)).float())


@dataclass
class Stats:
    res: KronRotation
    kind: str
    head: KronRotation
    head_dim: int
    down: KronRotation | None = None


@MITIGATIONS.register("rotate")
class Rotate(Mitigation):
    name = "rotate"
    needs = ("arch",)

    class Options(Options):
        kind: Literal["hadamard", "random"] = "hadamard"
        down: bool = True
        heads: bool = True
        seed: int = Field(0, ge=0)

    def check(self, model: nn.Module, plan, opts) -> None:
        super().check(model, plan, opts)
        if arch_of(model).norm_kind != "rms":
            raise QuantbenchError(f"rotate: {model.config.model_type} uses LayerNorm (mean subtraction, bias); "
                                  "norm fusing and rotation support RMSNorm families (llama, mistral, qwen2/3) only")

    def calibrate(self, model: nn.Module, ctx: QuantContext, opts: Options) -> Stats:
        """Rotations are data-free: build the matrices (seeded) only."""
        gen = torch.Generator().manual_seed(opts.seed)
        cfg = model.config
        hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        res, res_kind = make_rotation(cfg.hidden_size, opts.kind, gen)
        out = Stats(res, res_kind, make_rotation(hd, opts.kind, gen)[0], hd)
        down_in = get_module(get_module(model, ctx.arch.layers)[0], ctx.arch.down)
        if opts.down and is_linear(down_in):
            out.down = make_rotation(down_in.weight.shape[1], opts.kind, gen)[0]
        return out

    @torch.no_grad()
    def apply(self, model: nn.Module, stats: Stats, ctx: QuantContext, opts: Options) -> Effects:
        arch = ctx.arch
        eff = Effects(notes={"rotate_kind": stats.kind})
        untied = untie(model, arch)
        eff.notes["rotate_untied"] = untied
        if untied:
            eff.added_params.append(f"{arch.lm_head}.weight")
        fuse_norms(model, arch)
        q = stats.res.matrix()  # [D, D] float64
        emb, head = get_module(model, arch.embed), get_module(model, arch.lm_head)
        emb.weight.data.copy_((emb.weight.data.float() @ q.float()).to(emb.weight.dtype))  # [V, D]: fp32 is enough
        head.weight.data.copy_((head.weight.data.float() @ q.float()).to(head.weight.dtype))
        for i, layer in enumerate(get_module(model, arch.layers)):
            for p in (*arch.qkv, *arch.up):
                _rot_in(get_module(layer, p), q)
            for p in (arch.o, arch.down):
                _rot_out(get_module(layer, p), q)
            if opts.heads:
                _rotate_heads(layer, arch, stats.head.matrix(), stats.head_dim)
            if stats.down is not None:
                down = get_module(layer, arch.down)
                _rot_in(down, stats.down.matrix())
                attach_online(down, stats.down)
                eff.online[f"{arch.layers}.{i}.{arch.down}"] = stats.down
        eff.residual_basis = q.float()  # residual now lives in h @ Q; fidelity probes undo it
        return eff
