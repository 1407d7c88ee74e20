"""Rotation of the residual stream and of down_proj's input (QuaRot / SpinQuant style, no training).

Steps (each leaves the FP function unchanged up to float rounding; declared in the Effects:
untied lm_head as an added parameter, the residual basis Q, the online transforms):
1. Untie lm_head from the embeddings (the default model ties them) so each can be rotated alone.
2. Fuse RMSNorm gains into the matrices they feed (q/k/v, gate/up, MoE routers and experts,
   lm_head; Gemma's (1 + w) norms likewise, then w = 0); norms become the identity scale. RMSNorm
   commutes with an orthogonal Q because ||hQ|| = ||h||. Families where that does not hold are
   refused in one line: LayerNorm (mean subtraction, bias), or a residual stream written through
   weighted post-norms (Gemma2/3, OLMo2: RMSNorm(y)·w Q is not RMSNorm(y Q)·w').
3. Residual rotation h' = h Q: embeddings E <- E Q (a scale such as Gemma's sqrt(d) commutes);
   residual readers W <- W Q (every reader the topology found, routers included);
   residual writers (o, down, every expert's down) W <- Q^T W, b <- Q^T b.
4. Online rotation of each down projection's input: W <- W H and x -> x H before it, declared in
   the Effects as an online transform (a forward pre-hook; backends re-attach it to the module they
   create). H is applied as a Kronecker product of small factors (cheap).
5. Per-head rotation of V (the v rows of a fused qkv projection) and of o's input (offline, exact:
   attention mixes V linearly per head), wherever the topology verified v -> o.
6. Optionally (`o_online`), an online rotation of o's whole input (across heads, as QuaRot's online
   Hadamard before out_proj): W_o <- W_o H and x -> x H before it, declared like step 4.

Options:
  kind: "hadamard" (default; randomized Hadamard, exact order via Sylvester x Paley factors, e.g.
        576 = 12 x 12 x 4; random orthogonal when no Hadamard of that order is built) or "random".
  down: rotate down_proj's input online (default true). heads: rotate V/o per head (default true).
  o_online: rotate o_proj's whole input online (default false).
  seed: random signs / random matrices (default 0).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn as nn
from pydantic import Field

from ...core.errors import QuantbenchError
from ...modeling.arch import arch_of, get_module
from ...modeling.surgery import attach_online, get_weight, scale_in, set_weight
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


def rotation_issue(model: nn.Module, arch) -> str | None:
    """Why the residual stream of this family cannot be rotated exactly (one line), or None."""
    fam = arch.family
    if arch.norm_kind not in ("rms", "rms+1"):
        return (f"{fam} uses LayerNorm (mean subtraction, bias), which does not commute with a rotation of "
                "the residual stream; rotation supports RMSNorm families")
    issue = next((t.residual_issue for t in arch.layer_topos if t.residual_issue), None)
    if issue:
        return issue
    norms = [arch.layer_path(i, n) for i, t in enumerate(arch.layer_topos) for n in (t.attn_norm, t.mlp_norm) if n]
    if arch.final_norm is None or any(getattr(get_module(model, n), "bias", None) is not None for n in norms):
        return f"{fam}: a residual norm is missing or has a bias"
    for i, t in enumerate(arch.layer_topos):
        folded = {p.prev for p in t.pairs_of(("qkv", "up"))}
        for n in (t.attn_norm, t.mlp_norm):
            if n and n not in folded:
                return f"{fam}: the output of {n} (layer {i}) feeds more than matrices, so its gain cannot be folded"
    return None


def _identity_weight(norm: nn.Module, kind: str) -> None:
    norm.weight.data.fill_(0.0 if kind == "rms+1" else 1.0)  # Gemma's (1 + w): w = 0 is the identity scale


def _gain(norm: nn.Module, kind: str) -> torch.Tensor:
    w = norm.weight.data.float()
    return 1.0 + w if kind == "rms+1" else w


@torch.no_grad()
def fuse_norms(model: nn.Module, arch) -> None:
    """RMSNorm gains (w, or Gemma's 1 + w) folded into the matrices reading them (routers too); the
    norms become the identity scale."""
    issue = rotation_issue(model, arch)
    if issue:
        raise QuantbenchError(f"rotate: {issue}")
    groups = [(arch.layer_path(i, p.prev), [arch.layer_path(i, r) for r in p.targets])
              for i, t in enumerate(arch.layer_topos) for p in t.pairs_of(("qkv", "up")) if p.prev in (t.attn_norm, t.mlp_norm)]
    groups.append((arch.final_norm, [arch.lm_head]))
    for norm_path, readers in groups:
        norm, kind = get_module(model, norm_path), arch.norm_kind_of(norm_path) or arch.norm_kind
        g = _gain(norm, kind)
        for r in readers:
            scale_in(get_module(model, r), g)
        _identity_weight(norm, kind)


def _rot_in(mod: nn.Module, q: torch.Tensor) -> None:
    set_weight(mod, (get_weight(mod).double() @ q).float())  # W [out, in] <- W Q


def _rot_out(mod: nn.Module, q: torch.Tensor) -> None:
    set_weight(mod, (q.T @ get_weight(mod).double()).float())  # W <- Q^T W
    if getattr(mod, "bias", None) is not None:
        mod.bias.data.copy_((q.T @ mod.bias.data.double()).to(mod.bias.dtype))


@torch.no_grad()
def _rotate_heads(layer: nn.Module, pair, hq: torch.Tensor, hd: int) -> None:
    """V rows (the v rows of a fused qkv projection) and o's input columns rotated per head by hq [hd, hd]."""
    v, o = get_module(layer, pair.prev), get_module(layer, pair.targets[0])
    rows = list(pair.rows) if pair.rows is not None else list(range(get_weight(v).shape[0]))
    nv, no = len(rows) // hd, get_weight(o).shape[1] // hd
    bv, bo = torch.block_diag(*[hq] * nv), torch.block_diag(*[hq] * no)
    w = get_weight(v).double()  # [out, in]
    w[rows] = bv.T @ w[rows]
    set_weight(v, w.float())
    if getattr(v, "bias", None) is not None:
        b = v.bias.data.double()
        b[rows] = bv.T @ b[rows]
        v.bias.data.copy_(b.to(v.bias.dtype))
    set_weight(o, (get_weight(o).double() @ bo).float())


def _o_names(arch) -> list[str]:
    return [arch.layer_path(i, t.o) for i, t in enumerate(arch.layer_topos) if t.o]


@dataclass
class Stats:
    res: KronRotation
    kind: str
    head: KronRotation
    head_dim: int
    down: dict[int, KronRotation] = field(default_factory=dict)  # online rotation per input size (down, o)


@MITIGATIONS.register("rotate")
class Rotate(Mitigation):
    name = "rotate"
    needs = ("arch",)

    class Options(Options):
        kind: Literal["hadamard", "random"] = "hadamard"
        down: bool = True
        heads: bool = True
        o_online: bool = False
        seed: int = Field(0, ge=0)

    def check(self, model: nn.Module, plan, opts) -> None:
        super().check(model, plan, opts)
        issue = rotation_issue(model, arch_of(model))
        if issue:
            raise QuantbenchError(f"recipe '{plan.recipe.name}': rotate: {issue}")

    def calibrate(self, model: nn.Module, ctx: QuantContext, opts: Options) -> Stats:
        """Rotations are data-free: build the matrices (seeded) only."""
        gen = torch.Generator().manual_seed(opts.seed)
        arch = ctx.arch
        d = get_weight(get_module(model, arch.lm_head)).shape[1]
        res, res_kind = make_rotation(d, opts.kind, gen)
        out = Stats(res, res_kind, make_rotation(arch.head_dim, opts.kind, gen)[0], arch.head_dim)
        online = (arch.names("downs") if opts.down else []) + (_o_names(arch) if opts.o_online else [])
        for name in online:
            n = get_weight(get_module(model, name)).shape[1]
            if n not in out.down:
                out.down[n] = make_rotation(n, opts.kind, gen)[0]
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
        skipped_heads = 0
        for i, layer in enumerate(get_module(model, arch.layers)):
            t = arch.layer(i)
            for p in t.stream_readers:  # routers included: their logits must not change
                _rot_in(get_module(layer, p), q)
            for p in (t.o, *t.downs):
                _rot_out(get_module(layer, p), q)
            o_pairs = t.pairs_of(("o",))
            if opts.heads and o_pairs:
                _rotate_heads(layer, o_pairs[0], stats.head.matrix(), stats.head_dim)
            skipped_heads += int(opts.heads and not o_pairs)
            for p in (*(t.downs if opts.down else ()), *((t.o,) if opts.o_online and t.o else ())):
                mod = get_module(layer, p)
                rot = stats.down[get_weight(mod).shape[1]]
                _rot_in(mod, rot.matrix())
                attach_online(mod, rot)
                eff.online[arch.layer_path(i, p)] = rot
        if skipped_heads:
            eff.notes["rotate_heads_skipped_layers"] = skipped_heads  # v -> o not exact there (see the topology)
        eff.residual_basis = q.float()  # residual now lives in h @ Q; fidelity probes undo it
        return eff
