"""Forward hooks that feed the streaming statistics: residual stream, linear inputs, the writers of
the residual stream (attention output and MLP down projection) and attention probabilities."""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..core.hooks import first_tensor
from ..modeling.arch import ArchSpec, LayerTopo, get_module
from ..modeling.moe import ExpertList
from ..modeling.surgery import weight_view
from .stats import SiteStats

EXPERT = re.compile(r"^(.*\bexperts\.\d+)\.")


def linear_input_sites(topo: LayerTopo) -> dict[str, tuple[str, ...]]:
    """One hooked module per distinct input -> the linears that read the same tensor (layer-relative).
    A norm's readers share one site (a reader that sees every token: never an expert); every expert
    gets its own site (the tokens routed to it), and so do o and every down projection."""
    sites: dict[str, tuple[str, ...]] = {}
    routers = set(topo.routers)
    for _src, readers in topo.reads:
        full = [r for r in readers if not EXPERT.match(r)]
        quantized = tuple(r for r in full if r not in routers)
        if full and quantized:
            sites[full[0] if full[0] not in routers else quantized[0]] = quantized
        units: dict[str, list[str]] = {}
        for r in readers:
            m = EXPERT.match(r)
            if m:
                units.setdefault(m.group(1), []).append(r)
        for rs in units.values():
            sites[rs[0]] = tuple(rs)
    for w in (topo.o, *topo.downs):
        if w:
            sites[w] = (w,)
    return sites


@dataclass
class WriterStats:
    """Per output dim of a module writing the residual stream: signed extreme output and, for a
    linear, the input column that contributed most to it (w[d, j] * x[j] at that token)."""

    extreme: torch.Tensor | None = None  # [D]
    column: torch.Tensor | None = None  # [D] dominant input column
    share: torch.Tensor | None = None  # [D] that column's contribution / output
    who: torch.Tensor | None = None  # [D] which writer (index into `writers`) holds the extreme
    writers: list[str] = field(default_factory=list)  # layer-relative paths (several in an MoE layer)

    def writer_of(self, d: int) -> str | None:
        return self.writers[int(self.who[d])] if self.who is not None and self.writers else None

    @torch.no_grad()
    def update(self, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, m: int = 8, wid: int = 0) -> None:
        """x [B, T, I] input, y [B, T, D] output, w [D, I] weight; columns are attributed for the m
        dims with the largest output in this batch (the others keep -1 unless seen earlier)."""
        d = y.shape[-1]
        yf = y.detach().float().reshape(-1, d)  # [B*T, D]
        lo, hi = yf.amin(0), yf.amax(0)  # [D], [D]
        signed = torch.where(hi >= -lo, hi, lo)  # [D] value of the largest |y| per dim
        am = signed.abs()
        dims = am.topk(min(m, d)).indices  # [m]
        arg = yf[:, dims].abs().argmax(0)  # [m] token of each top dim's extreme
        xs = x.detach().float().reshape(-1, x.shape[-1])[arg]  # [m, I]: input at each dim's extreme token
        contrib = w[dims].float() * xs  # [m, I]
        best = contrib.abs().argmax(1)  # [m]
        denom = signed[dims].where(signed[dims] != 0, torch.ones_like(am[dims]))
        col, share = torch.full((d,), -1), torch.zeros(d)
        col[dims], share[dims] = best, contrib.gather(1, best[:, None]).squeeze(1) / denom
        who = torch.full((d,), wid)
        if self.extreme is None:
            self.extreme, self.column, self.share, self.who = signed, col, share, who
            return
        better = am > self.extreme.abs()
        self.extreme = torch.where(better, signed, self.extreme)
        self.column = torch.where(better, col, self.column)
        self.share = torch.where(better, share, self.share)
        self.who = torch.where(better, who, self.who)


@dataclass
class AttnStats:
    """Per head: attention mass each key receives, mean over queries 1..T-1 (so it sums to 1 over keys)."""

    threshold: float
    n_seqs: int = 0
    first_mass: torch.Tensor | None = None  # [H] summed over sequences
    first_sink: torch.Tensor | None = None  # [H] sequences where key 0 is a sink
    other_max: torch.Tensor | None = None  # [H] max mass on any non-initial key
    sinks: Counter = field(default_factory=Counter)  # (seq, pos) -> number of heads with a sink there

    @torch.no_grad()
    def update(self, w: torch.Tensor, seq0: int) -> None:
        """w [B, H, Tq, Tk] attention probabilities."""
        mass = w.detach().float()[:, :, 1:, :].mean(2)  # [B, H, Tk]
        b, h, _ = mass.shape
        if self.first_mass is None:
            self.first_mass, self.first_sink, self.other_max = torch.zeros(h), torch.zeros(h), torch.zeros(h)
        self.n_seqs += b
        self.first_mass += mass[:, :, 0].sum(0)
        self.first_sink += (mass[:, :, 0] > self.threshold).float().sum(0)
        if mass.shape[-1] > 1:
            self.other_max = torch.maximum(self.other_max, mass[:, :, 1:].amax((0, 2)))
        for bi, _hi, k in (mass > self.threshold).nonzero().tolist():
            self.sinks[(seq0 + bi, k)] += 1


@dataclass
class LayerStats:
    residual: SiteStats
    inputs: dict[str, SiteStats]  # hooked linear path -> stats of its input
    attn_out: WriterStats = field(default_factory=WriterStats)
    mlp_out: WriterStats = field(default_factory=WriterStats)
    attn: AttnStats | None = None
    routed: dict[str, torch.Tensor] = field(default_factory=dict)  # expert list -> tokens routed to each expert


class Collector:
    """Builds the (module, hook) pairs for every decoder layer; hooks write into `layers`."""

    def __init__(self, arch: ArchSpec, layers: nn.ModuleList, hidden: int, top_k: int, floor: float,
                 max_records: int, sink_threshold: float, linear_inputs: bool = True) -> None:
        self.arch, self.blocks = arch, layers
        self.seq0 = 0  # census index of the current batch's first sequence
        self.shape = (1, 1)  # (B, T) of the current batch: some families (OPT) flatten tokens in the MLP
        self.sites = [linear_input_sites(arch.layer(i)) if linear_inputs else {} for i in range(len(layers))]
        self.layers = [LayerStats(SiteStats(hidden, top_k, floor, max_records),
                                  {p: SiteStats(0, top_k, floor, 0, keep_records=False) for p in self.sites[i]},
                                  attn=AttnStats(sink_threshold)) for i in range(len(layers))]

    def pairs(self) -> list[tuple[nn.Module, object]]:
        out: list[tuple[nn.Module, object]] = []
        for i, block in enumerate(self.blocks):
            st, topo = self.layers[i], self.arch.layer(i)
            out.append((block, self._residual_hook(st)))
            out.append((get_module(block, topo.attn), self._attn_hook(st)))
            for path in self.sites[i]:
                m = EXPERT.match(path)
                unit = get_module(block, m.group(1)) if m else None
                out.append((get_module(block, path), self._input_hook(st.inputs[path], unit)))
            st.mlp_out.writers = list(topo.downs)
            for wid, (path, ws) in enumerate([(topo.o, st.attn_out)] + [(d, st.mlp_out) for d in topo.downs]):
                mod = get_module(block, path)
                out.append((mod, self._writer_hook(ws, mod, max(wid - 1, 0))))
            for name, mod in block.named_modules():
                if isinstance(mod, ExpertList):
                    out.append((mod, self._routing_hook(st, name, len(mod))))
        return out

    def _bt(self, x: torch.Tensor) -> torch.Tensor:
        """[B*T, D] or [B, T, D] -> [B, T, D]."""
        return x.reshape(*self.shape, x.shape[-1]) if x.dim() == 2 else x

    def _residual_hook(self, st: LayerStats):
        def fn(_m, _inp, out):
            st.residual.update(self._bt(first_tensor(out)), self.seq0)
        return fn

    def _input_hook(self, site: SiteStats, unit: nn.Module | None):
        """unit: the expert whose linear this is (its rows are the tokens routed to it, `unit.tokens`)."""
        def fn(_m, inp, _out):
            if unit is not None:
                site.update_rows(inp[0].reshape(-1, inp[0].shape[-1]), self.shape[1], self.seq0, unit.tokens)
            else:
                site.update(self._bt(inp[0]), self.seq0)
        return fn

    def _writer_hook(self, ws: WriterStats, mod: nn.Module, wid: int):
        def fn(_m, inp, out):
            ws.update(inp[0], first_tensor(out), weight_view(mod), wid=wid)
        return fn

    def _routing_hook(self, st: LayerStats, name: str, n_experts: int):
        def fn(_m, inp, _out):
            counts = torch.bincount(inp[1].reshape(-1).cpu(), minlength=n_experts)[:n_experts]  # [E]
            st.routed[name] = counts if name not in st.routed else st.routed[name] + counts
        return fn

    def _attn_hook(self, st: LayerStats):
        def fn(_m, _inp, out):
            if isinstance(out, (tuple, list)) and len(out) > 1 and isinstance(out[1], torch.Tensor):
                st.attn.update(out[1], self.seq0)
        return fn
