"""Topology by tracing: what every decoder layer reads, computes and writes, from one recorded forward.

From the graph of quantbench.modeling.arch.graph (one forward on a few random tokens, eager attention):
- the decoder layers: the nn.ModuleList whose blocks run in order, each returning the residual sum;
- the residual stream of a layer: its input and every sum that adds to it;
- writers: linears whose output reaches the residual sum through row-wise ops only (o, down, every
  expert's down weighted by its router probability); norms on that path are post-norms (Gemma2/3);
- readers: modules applying a matrix to a norm's output or to the residual stream itself;
- attention vs MLP: a writer whose input descends from a product of two activations (q kᵀ,
  softmax) is the attention output projection; the readers feeding it are q/k/v, those feeding
  the other writers are the MLP's (gate/up; routers feed neither and are kept in high precision);
- norm kinds by probing each norm (x/rms·w, x/rms·(1+w), LayerNorm);
- the k/v projections: the linears the KV cache tensors descend from.
Smoothing pairs are then *verified* by quantbench.modeling.arch.pairs (perturbation passes), never assumed.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ...core.errors import UnsupportedArchitecture
from ...core.hooks import eager_attention
from ..moe import ExpertList
from .graph import ADD, PASS_THROUGH, Graph, Span, is_norm, owns_matrix, record

HEAD_OPS = {"matmul", "__matmul__", "bmm", "baddbmm", "einsum", "scaled_dot_product_attention", "softmax"}
ROW_SCALE = {"mul", "__mul__", "__rmul__", "mul_", "div", "__truediv__", "div_"}
INDEX_ADD = {"index_add_", "index_add", "scatter_add_", "scatter_add"}
SHAPE_ONLY = {"zeros_like", "empty_like", "ones_like", "new_zeros", "new_empty", "new_ones", "full_like"}


@dataclass
class LayerGraph:
    """One decoder layer's slice of the graph: nodes [lo, hi), residual tensor ids R."""

    i: int
    path: str
    lo: int
    hi: int
    R: set[int] = field(default_factory=set)

    def rel(self, name: str) -> str:
        return name[len(self.path) + 1:] if name.startswith(self.path + ".") else name


class Tracer:
    def __init__(self, model: nn.Module, g: Graph):
        self.model, self.g = model, g
        self.mods = dict(model.named_modules())

    def node_mod(self, k: int) -> nn.Module:
        return self.mods[self.g.nodes[k].name]

    def is_float(self, tid: int) -> bool:
        t = self.g.tensors.get(tid)
        return t is not None and t.is_floating_point()

    # --- walks -----------------------------------------------------------------------------------
    def source(self, tid: int, before: int, R: set[int]) -> tuple[str, int | None]:
        """Walk back through channel-preserving ops: ('residual', None), ('module', node) or ('op', node)."""
        g = self.g
        while True:
            if tid in R:
                return "residual", None
            p = g.producer(tid, before)
            if p is None:
                return "none", None
            n = g.nodes[p]
            if n.kind == "module":
                return "module", p
            if n.name in PASS_THROUGH and n.ins and g.width(n.ins[0]) == g.width(tid):
                tid, before = n.ins[0], p
                continue
            return "op", p

    def residual_read(self, tid: int, before: int, R: set[int]) -> int | None:
        """The residual tensor that tid is (through channel-preserving ops), or None."""
        g = self.g
        while tid not in R:
            p = g.producer(tid, before)
            n = g.nodes[p] if p is not None else None
            if n is None or n.kind != "op" or n.name not in PASS_THROUGH or not n.ins:
                return None
            tid, before = n.ins[0], p
        return tid

    def stream_read(self, nodes: list[int], lay: LayerGraph) -> int | None:
        """The residual tensor the first of these reader nodes reads (directly or through its norm)."""
        if not nodes:
            return None
        k = nodes[0]
        kind, p = self.source(self.g.nodes[k].ins[0], k, lay.R)
        if kind == "module" and self.g.nodes[p].ins:
            return self.residual_read(self.g.nodes[p].ins[0], p, lay.R)
        return self.residual_read(self.g.nodes[k].ins[0], k, lay.R) if kind == "residual" else None

    def ancestors(self, tid: int, before: int, lay: LayerGraph, through: bool = False) -> tuple[set[int], set[str]]:
        """Matrix-applying modules and op names that tensor tid descends from inside the layer
        (through any op and through norms; through other matrices too if `through`; never through
        the residual stream, nor through integer tensors such as routing indices)."""
        g, mats, ops, seen = self.g, set(), set(), set()
        stack = [(tid, before)]
        while stack:
            t, b = stack.pop()
            if t in lay.R or (t, b) in seen or not self.is_float(t):
                continue
            seen.add((t, b))
            p = g.producer(t, b)
            if p is None or p < lay.lo:
                continue
            n = g.nodes[p]
            if n.kind == "module":
                mod = self.node_mod(p)
                if owns_matrix(mod):
                    mats.add(p)
                    if through:
                        stack += [(x, p) for x in n.ins[:1]]
                elif is_norm(mod):
                    stack += [(x, p) for x in n.ins[:1]]
                continue
            ops.add(n.name)
            stack += [(x, p) for x in n.ins]
        return mats, ops

    def residual(self, lay: LayerGraph, inp: int) -> None:
        lay.R = {inp}
        for k in range(lay.lo, lay.hi):
            n = self.g.nodes[k]
            if n.kind == "op" and (n.name in ADD or n.name in PASS_THROUGH) and any(t in lay.R for t in n.ins):
                lay.R.update(n.outs)

    def writers(self, lay: LayerGraph) -> tuple[list[int], list[int], list[str]]:
        """Walk back from every residual sum through row-wise ops: (writer nodes, post-norm nodes,
        ops met on the way that are not row-wise)."""
        g, writers, post, blocked = self.g, [], [], []
        stack, seen = [], set()
        for k in range(lay.lo, lay.hi):
            n = g.nodes[k]
            if n.kind == "op" and n.name in ADD and set(n.outs) & lay.R:
                stack += [(t, k) for t in n.ins if t not in lay.R and self.is_float(t)]
        while stack:
            t, b = stack.pop()
            if t in lay.R or (t, b) in seen:
                continue
            seen.add((t, b))
            p = g.producer(t, b)
            if p is None or p < lay.lo:
                blocked.append("a tensor from outside the layer")
                continue
            n = g.nodes[p]
            if n.kind == "module":
                mod = self.node_mod(p)
                if owns_matrix(mod):
                    writers.append(p) if p not in writers else None
                elif is_norm(mod):
                    post.append(p) if p not in post else None
                    stack.append((n.ins[0], p))
                else:
                    blocked.append(n.name)
                continue
            stack += self._row_wise(n, t, p, blocked)
        return sorted(writers), sorted(post), blocked

    def _row_wise(self, n, t: int, p: int, blocked: list[str]) -> list[tuple[int, int]]:
        g = self.g
        floats = [x for x in n.ins if self.is_float(x)]
        if n.name in PASS_THROUGH:
            return [(x, p) for x in floats[:1]]
        if n.name in ADD:
            return [(x, p) for x in floats]
        if n.name in INDEX_ADD:
            return [(x, p) for x in floats]
        if n.name in SHAPE_ONLY:
            return []
        if n.name in ROW_SCALE:
            wide = [x for x in floats if g.width(x) == g.width(t)]
            narrow = [x for x in floats if x not in wide]
            if len(wide) == 1 and all((g.width(x) or 1) == 1 for x in narrow):
                return [(wide[0], p)]
        blocked.append(n.name)
        return []

    def bad_consumers(self, tid: int, after: int, allow_norms: bool, lay: LayerGraph | None = None) -> list[str]:
        """Consumers of tid (through channel-preserving ops) that are not matrix readers (or norms,
        or residual sums, when reading the residual stream)."""
        g, bad, stack, seen = self.g, [], [(tid, after)], set()
        while stack:
            t, a = stack.pop()
            if t in seen:
                continue
            seen.add(t)
            for c in g.consumers.get(t, []):
                if c <= a or (lay is not None and c >= lay.hi):
                    continue
                n = g.nodes[c]
                if n.kind == "module":
                    mod = self.node_mod(c)
                    if not (owns_matrix(mod) or (allow_norms and is_norm(mod))):
                        bad.append(n.name)
                elif n.name in PASS_THROUGH and g.width(n.outs[0]) == g.width(t):
                    stack += [(o, c) for o in n.outs]
                elif lay is not None and (set(n.outs) & lay.R):
                    continue  # a residual sum
                elif n.name not in SHAPE_ONLY:
                    bad.append(n.name)
        return bad


def lca(paths: list[str]) -> str | None:
    """Longest common dotted prefix that names a module strictly above the paths."""
    if not paths:
        return None
    parts = [p.split(".")[:-1] for p in paths]
    out = []
    for segs in zip(*parts):
        if len(set(segs)) != 1:
            break
        out.append(segs[0])
    return ".".join(out) or None


def _layer_list(model: nn.Module, g: Graph) -> tuple[str, list[Span]]:
    """The ModuleList whose every block ran once, in order (most parameters among such lists)."""
    called: dict[str, list[Span]] = {}
    for sp in g.spans:
        called.setdefault(sp.name, []).append(sp)
    best, best_n = None, -1
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or isinstance(mod, ExpertList) or len(mod) == 0:
            continue
        spans = [called.get(f"{name}.{k}", []) for k in range(len(mod))]
        if any(len(s) != 1 for s in spans):
            continue
        spans = [s[0] for s in spans]
        if any(a.first > b.first for a, b in zip(spans, spans[1:])):
            continue
        n = sum(p.numel() for p in mod.parameters())
        if n > best_n:
            best, best_n = (name, spans), n
    if best is None:
        raise UnsupportedArchitecture("no decoder layer list found (an nn.ModuleList of blocks that run once each, "
                                      "in order)")
    return best


def _module_name(model: nn.Module, mod: nn.Module | None) -> str | None:
    for n, m in model.named_modules():
        if m is mod:
            return n
    return None


def _expand_experts(names: list[str], model: nn.Module, layer_path: str) -> list[str]:
    """Experts the trace did not route to still get listed: 'mlp.experts.1.up_proj' -> every expert."""
    out: list[str] = []
    for n in names:
        m = re.match(r"(.*\bexperts)\.(\d+)\.(.*)", n)
        if m and isinstance(model.get_submodule(f"{layer_path}.{m.group(1)}"), ExpertList):
            k = len(model.get_submodule(f"{layer_path}.{m.group(1)}"))
            out += [f"{m.group(1)}.{e}.{m.group(3)}" for e in range(k)]
        else:
            out.append(n)
    order = {n: i for i, (n, _) in enumerate(model.get_submodule(layer_path).named_modules())}
    return sorted(dict.fromkeys(out), key=lambda n: order.get(n, 1 << 30))


@dataclass
class RawLayer:
    """What the graph says about one layer, before the pairs are verified."""

    topo: dict
    norm_sources: dict[str, list[str]]  # source norm (or "") -> readers (layer-relative)
    norm_issues: dict[str, list[str]]  # source norm -> consumers that are not matrix readers
    writer_feeds: dict[str, list[str]]  # writer -> the readers it descends from


def analyse_layer(tr: Tracer, lay: LayerGraph, inp: int) -> RawLayer:
    g, model = tr.g, tr.model
    tr.residual(lay, inp)
    writers, post, blocked = tr.writers(lay)
    readers, sources = [], {}
    for k in range(lay.lo, lay.hi):
        n = g.nodes[k]
        if n.kind != "module" or not owns_matrix(tr.node_mod(k)) or not n.ins:
            continue
        kind, p = tr.source(n.ins[0], k, lay.R)
        if kind == "residual" or (kind == "module" and is_norm(tr.node_mod(p))):
            key = "" if kind == "residual" else lay.rel(g.nodes[p].name)
            readers.append(k)
            sources.setdefault(key, []).append(lay.rel(n.name))
    if not writers:
        raise UnsupportedArchitecture(f"layer {lay.i}: no linear writes the residual stream")
    attn_w, mlp_w, feeds, behind = [], [], {}, {}
    for w in writers:
        mats, ops = tr.ancestors(g.nodes[w].ins[0], w, lay)
        (attn_w if ops & HEAD_OPS else mlp_w).append(w)
        feeds[lay.rel(g.nodes[w].name)] = [lay.rel(g.nodes[m].name) for m in sorted(mats) if m in readers]
        every, _ = tr.ancestors(g.nodes[w].ins[0], w, lay, through=True)  # readers behind other matrices (MLA)
        behind[lay.rel(g.nodes[w].name)] = [lay.rel(g.nodes[m].name) for m in sorted(every) if m in readers]
    rel = [lay.rel(g.nodes[w].name) for w in attn_w]
    if len(rel) != 1:
        raise UnsupportedArchitecture(f"layer {lay.i}: expected one attention output projection writing the "
                                      f"residual stream, found {rel or 'none'}")
    o = rel[0]
    downs = [lay.rel(g.nodes[w].name) for w in mlp_w]
    qkv = behind[o]
    up = list(dict.fromkeys(r for d in downs for r in behind[d]))
    all_readers = [lay.rel(g.nodes[k].name) for k in readers]
    routers = [r for r in all_readers if r not in qkv and r not in up]
    issues, stream = {}, []
    for key, names in sources.items():
        node = next(k for k in readers if lay.rel(g.nodes[k].name) == names[0])
        kind, p = tr.source(g.nodes[node].ins[0], node, lay.R)
        if key:
            issues[key] = tr.bad_consumers(g.nodes[p].outs[0], p, allow_norms=False)
        if not key or tr.residual_read(g.nodes[p].ins[0], p, lay.R) is not None:
            stream += names  # reads the residual stream, directly or through a norm of it
    reads = {side: tr.stream_read([k for k in readers if lay.rel(g.nodes[k].name) in names], lay)
             for side, names in (("attn", qkv), ("mlp", up))}
    res_bad = [b for t in list(lay.R) for b in tr.bad_consumers(t, lay.lo - 1, allow_norms=True, lay=lay)]
    post_names = [lay.rel(g.nodes[p].name) for p in post]
    topo = _topo_fields(model, lay, qkv, o, up, downs, all_readers, routers, post_names, sources, reads, stream)
    topo["residual_issue"] = _residual_issue(model, post_names, blocked, res_bad)
    topo["gated"] = any(len(feeds[d]) >= 2 for d in downs)
    topo["stream_readers"] = tuple(_expand_experts(stream, model, lay.path))
    return RawLayer(topo, sources, issues, feeds)


def _topo_fields(model, lay, qkv, o, up, downs, readers, routers, post, sources, reads, stream) -> dict:
    g_src = {r: s for s, rs in sources.items() for r in rs if r in stream}  # norms of the residual stream only
    attn_norm = _main_source(qkv, g_src)
    mlp_norm = _main_source(up, g_src)
    parallel = reads["attn"] is not None and reads["attn"] == reads["mlp"]
    lists = {n: m for n, m in model.get_submodule(lay.path).named_modules() if isinstance(m, ExpertList)}
    experts = [f"{n}.{e}" for n, m in lists.items() for e in range(len(m))]
    expand = lambda xs: tuple(_expand_experts(list(xs), model, lay.path))  # noqa: E731
    ups, dns = expand(up), expand(downs)
    return dict(attn=lca(list(qkv) + [o]), attn_norm=attn_norm or None,
                mlp_norm=None if (mlp_norm == attn_norm) else (mlp_norm or None),
                qkv=expand(qkv), o=o, up=ups, downs=dns, readers=expand(readers), routers=expand(routers),
                post_norms=tuple(post), mlp=lca(list(ups) + list(dns) + list(routers)), experts=tuple(experts),
                parallel=parallel)


def _main_source(readers: list[str], src: dict[str, str]) -> str | None:
    """The norm most of these readers read ('' = the residual stream itself), None if none."""
    keys = [src[r] for r in readers if r in src]
    return max(set(keys), key=keys.count) if keys else None


def _residual_issue(model, post: list[str], blocked: list[str], res_bad: list[str]) -> str | None:
    fam = getattr(model.config, "model_type", "?")
    if post:
        names = ", ".join(sorted(set(post)))
        return (f"{fam} writes the residual stream through weighted norms ({names}), which do not commute with "
                "a rotation of the residual stream")
    if blocked:
        return f"{fam} writes the residual stream through {sorted(set(blocked))[0]}, not a row-wise op"
    if res_bad:
        return f"{fam} reads the residual stream with {sorted(set(res_bad))[0]}, not a matrix or a norm"
    return None


__all__ = ["Tracer", "LayerGraph", "analyse_layer", "lca", "trace_graph"]


def trace_graph(model: nn.Module, n_tokens: int = 16, seed: int = 0) -> tuple[Graph, object, torch.Tensor]:
    """Record one eager forward on 2 x n_tokens random token ids."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if not isinstance(emb, nn.Embedding):
        raise UnsupportedArchitecture("no input embedding found (model.get_input_embeddings())")
    vocab = int(getattr(model.config, "vocab_size", 0) or emb.num_embeddings)
    gen = torch.Generator().manual_seed(seed)
    dev = next(model.parameters()).device
    ids = torch.randint(min(3, vocab - 1), vocab, (2, n_tokens), generator=gen).to(dev)
    was_training = model.training
    model.eval()
    try:
        with eager_attention(model):
            try:
                g, out = record(model, ids)
            except TypeError:  # a model without a KV cache argument
                g, out = record(model, ids, use_cache=None)
    finally:
        model.train(was_training)
    return g, out, ids
