"""From the traced graph to an ArchSpec, with every smoothing pair verified on the model itself.

A pair (prev -> targets) is exact when dividing prev's output channels by any positive s and
multiplying the targets' input columns by s leaves the function unchanged. Candidates come from
the graph (norm -> its readers; for each writer, the readers it descends from) and, for fused or
grouped producers, from the few row layouts models use ([q|k|v] blocks, per-head or per-kv-group
[q.., k, v] interleaving, [gate|up] halves). Each candidate is tried in *every* layer (and expert)
at once with hooks that apply random s in [1/2, 2] and its compensation: it is kept only if every
layer output, the logits and the targets' inputs stay equal to float tolerance. A candidate that
fails is dropped with a one-line note (e.g. a norm whose output also feeds another norm, v -> o
when attention adds learned value biases, up -> down through a non-homogeneous activation).
"""
from __future__ import annotations

import re
from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...core.errors import UnsupportedArchitecture
from ..moe import fused_expert_modules, unfuse_experts
from ..surgery import in_features, out_features
from .graph import is_norm
from .spec import ArchSpec, LayerTopo, PairSpec
from .topology import LayerGraph, Tracer, _expand_experts, _layer_list, _module_name, analyse_layer, trace_graph

EXPERT = re.compile(r"\.\d+\.")


def template(name: str) -> str:
    """'mlp.experts.3.down_proj' -> 'mlp.experts.*.down_proj' (one template per expert slot)."""
    return EXPERT.sub(".*.", name)


# --- probes ------------------------------------------------------------------------------------
@torch.no_grad()
def norm_kind(mod: nn.Module) -> str | None:
    """'rms' (x/rms·w), 'rms+1' (x/rms·(1+w), Gemma) or 'layer' ((x-mean)/std·w + b), by calling it."""
    w = getattr(mod, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 1:
        return None
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(4, w.numel(), generator=gen) * 30 + 15).to(w.device, w.dtype)  # eps negligible
    y, xf, wf = mod(x).float(), x.float(), w.float()
    b = getattr(mod, "bias", None)
    bf = b.float() if isinstance(b, torch.Tensor) else torch.zeros_like(wf)
    rms = xf / xf.pow(2).mean(-1, keepdim=True).sqrt()
    ln = (xf - xf.mean(-1, keepdim=True)) / xf.var(-1, unbiased=False, keepdim=True).sqrt()
    tol = 1e-3 if w.dtype in (torch.float32, torch.float64) else 3e-2
    forms = {"rms": rms * wf + bf, "rms+1": rms * (1 + wf) + bf, "layer": ln * wf + bf}
    for kind, ref in forms.items():
        if (y - ref).abs().max() <= tol * max(float(ref.abs().max()), 1e-6):
            return kind
    return None


def _embed_scale(model: nn.Module, emb: nn.Module, ids: torch.Tensor, x0: torch.Tensor) -> float | None:
    ref = F.embedding(ids, emb.weight.detach()).float()  # [B, T, D]
    x = x0.float().reshape(ref.shape) if x0.numel() == ref.numel() else None
    if x is None:
        return None
    c = float((x * ref).sum() / (ref * ref).sum().clamp_min(1e-30))
    return round(c, 6) if torch.allclose(x, c * ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max())) else None


# --- candidates ---------------------------------------------------------------------------------
def _heads(model: nn.Module) -> tuple[int, int, int]:
    cfg = model.config
    d = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)
    h = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None) or 1
    hd = getattr(cfg, "head_dim", None) or (d // h if d else 0)
    kv = getattr(cfg, "num_key_value_heads", None) or getattr(cfg, "num_kv_heads", None) or h
    if getattr(cfg, "multi_query", False) and not getattr(cfg, "new_decoder_architecture", False):
        kv = 1
    return h, kv, hd


def o_candidates(mods: dict[str, nn.Module], o: str, producers: list[str], hd: int, kv_cfg: int) -> list[PairSpec]:
    """v -> o: a separate v, or the v rows of a fused producer ([q|k|v], per-head or per-group [.., k, v])."""
    c_in = in_features(mods[o])
    if not hd or c_in % hd:
        return [PairSpec("o", p, (o,)) for p in reversed(producers) if out_features(mods[p]) == c_in]
    h = c_in // hd
    out: list[PairSpec] = []
    for p in reversed(producers):
        w = out_features(mods[p])
        for kv in dict.fromkeys(k for k in (kv_cfg, h, 1) if k and h % k == 0):
            n = kv * hd
            idx = None if kv == h else tuple((c // hd // (h // kv)) * hd + c % hd for c in range(c_in))
            if w == n:
                out.append(PairSpec("o", p, (o,), None, idx))
            elif w > n:
                for g in dict.fromkeys((1, kv, h)):
                    if w % g or n % g:
                        continue
                    per, m = w // g, n // g
                    rows = tuple(gi * per + per - m + j for gi in range(g) for j in range(m))
                    out.append(PairSpec("o", p, (o,), rows, idx))
    return list(dict.fromkeys(out))


def down_candidates(mods: dict[str, nn.Module], down: str, producers: list[str]) -> list[PairSpec]:
    """up -> down: a producer as wide as down's input, or one block of a fused [gate|up] producer."""
    i = in_features(mods[down])
    out = []
    for p in reversed(producers):
        w = out_features(mods[p])
        if w == i:
            out.append(PairSpec("down", p, (down,)))
        elif w % i == 0 and w // i in (2, 3):
            out += [PairSpec("down", p, (down,), tuple(range(j * i, (j + 1) * i))) for j in reversed(range(w // i))]
    return out


# --- verification -------------------------------------------------------------------------------
class Verifier:
    """Runs the model on the trace tokens with a pair set applied through hooks."""

    def __init__(self, model: nn.Module, ids: torch.Tensor, layers: nn.ModuleList, capture: set[nn.Module]):
        self.model, self.ids, self.layers = model, ids, layers
        self.strict = next(model.parameters()).dtype in (torch.float32, torch.float64)
        self.tol = 1e-4 if self.strict else 3e-2
        self.base = self._run([], capture)

    @torch.no_grad()
    def _run(self, pairs: list[tuple[nn.Module, PairSpec, list[nn.Module]]], capture: set[nn.Module]):
        hooks, outs, ins = [], [], {}
        gen = torch.Generator().manual_seed(1)
        try:
            for prev, spec, targets in pairs:
                n = len(spec.rows) if spec.rows is not None else out_features(prev) if prev.weight.dim() == 2 \
                    else prev.weight.numel()
                s = torch.exp((torch.rand(n, generator=gen) - 0.5) * 1.4)
                hooks.append(prev.register_forward_hook(_out_hook(spec.rows, 1.0 / s)))
                st = s[list(spec.index)] if spec.index is not None else s
                hooks += [t.register_forward_pre_hook(_in_hook(st), with_kwargs=True) for t in targets]
            for m in capture:
                hooks.append(m.register_forward_pre_hook(_keep_in(ins, m), with_kwargs=True))
            hooks += [lay.register_forward_hook(lambda _m, _a, o: outs.append(_first(o).float())) for lay in self.layers]
            logits = self.model(input_ids=self.ids).logits.float()
        finally:
            for h in hooks:
                h.remove()
        return outs, logits, ins

    def exact(self, pairs: list[tuple[nn.Module, PairSpec, list[nn.Module]]], first: set[nn.Module]) -> bool:
        """float32/64: every layer output, the logits and the targets' inputs unchanged. Half precision
        (where rounding can flip an MoE routing decision downstream): the inputs of `first`, the targets
        in the first layer the pairs apply to (nothing before them is perturbed)."""
        capture = {t for _, _, ts in pairs for t in ts}
        if capture - set(self.base[2]):
            self.base = self._run([], capture | set(self.base[2]))
        outs, logits, ins = self._run(pairs, capture)
        b_outs, b_logits, b_ins = self.base
        if not self.strict:
            outs, b_outs, logits, b_logits, capture = [], [], None, None, capture & first
        checks = list(zip(outs, b_outs)) + ([(logits, b_logits)] if logits is not None else []) + \
            [(a, b) for m in capture for a, b in zip(ins.get(m, []), b_ins.get(m, []))]
        if any(len(ins.get(m, [])) != len(b_ins.get(m, [])) for m in capture):
            return False
        return all(a.shape == b.shape and float((a - b).abs().max()) <= self.tol * max(float(b.abs().max()), 1e-6)
                   for a, b in checks)


def _first(o):
    return o[0] if isinstance(o, (tuple, list)) else o


def _out_hook(rows, inv):
    def fn(_m, _a, out):
        if rows is None:
            return out * inv.to(out)
        y = out.clone()
        y[..., list(rows)] = y[..., list(rows)] * inv.to(out)
        return y
    return fn


def _in_hook(s):
    def fn(_m, args, kwargs):
        if args:
            return (args[0] * s.to(args[0]), *args[1:]), kwargs
        k = next(iter(kwargs))
        return args, {**kwargs, k: kwargs[k] * s.to(kwargs[k])}
    return fn


def _keep_in(store: dict, mod: nn.Module):
    def fn(_m, args, kwargs):
        x = args[0] if args else next(iter(kwargs.values()))
        store.setdefault(mod, []).append(x.detach().float().clone())
    return fn


# --- the spec ------------------------------------------------------------------------------------
def _instantiate(cand: PairSpec, inst: str) -> PairSpec:
    """A candidate found for one expert slot, moved to expert `inst` (same slot, same layout)."""
    m = re.search(r"\.(\d+)\.", inst)
    if m is None or "*" not in template(cand.prev):
        return cand
    sub = lambda n: template(n).replace("*", m.group(1))  # noqa: E731
    return replace(cand, prev=sub(cand.prev), targets=tuple(sub(t) for t in cand.targets))


class Builder:
    def __init__(self, model: nn.Module):
        self.model = model
        self.g, self.out, self.ids = trace_graph(model)
        self.tr = Tracer(model, self.g)
        self.layers_path, spans = _layer_list(model, self.g)
        self.mods = dict(model.named_modules())
        self.lays, self.raws = [], []
        for i, sp in enumerate(spans):
            lay = LayerGraph(i, f"{self.layers_path}.{i}", sp.first, sp.last)
            raw = analyse_layer(self.tr, lay, sp.ins[0])
            if not sp.outs or sp.outs[0] not in lay.R:
                raise UnsupportedArchitecture(f"layer {i}'s output is not a residual sum (a post-norm block?)")
            self.lays.append(lay)
            self.raws.append(raw)
        self.h, self.kv_heads, self.hd = _heads(model)
        writers = {self.mod(i, w) for i, r in enumerate(self.raws) for w in [r.topo["o"], *r.topo["downs"]]}
        self.ver = Verifier(model, self.ids, model.get_submodule(self.layers_path), writers)

    def mod(self, i: int, rel: str) -> nn.Module:
        return self.mods[f"{self.layers_path}.{i}.{rel}"]

    def resolve(self, i: int, p: PairSpec):
        return self.mod(i, p.prev), p, [self.mod(i, t) for t in p.targets]

    def exact(self, pairs: list[tuple[int, PairSpec]]) -> bool:
        if not pairs:
            return False
        lo = min(i for i, _ in pairs)
        first = {self.mod(i, t) for i, p in pairs if i == lo for t in p.targets}
        return self.ver.exact([self.resolve(i, p) for i, p in pairs], first)

    # norm -> readers
    def norm_pairs(self, kinds: dict[str, str | None]) -> tuple[list[list[PairSpec]], list[list[str]]]:
        pairs = [[] for _ in self.raws]
        notes = [[] for _ in self.raws]
        for i, raw in enumerate(self.raws):
            topo = raw.topo
            for key, readers in raw.norm_sources.items():
                names = _order(_expand(readers, self.model, self.lays[i].path))
                side = "q/k/v" if set(names) & set(topo["qkv"]) else "MLP inputs"
                if not key:
                    notes[i].append(f"{side} read the residual stream directly: no norm to fold a scale into")
                elif kinds.get(f"{self.lays[i].path}.{key}") is None:
                    notes[i].append(f"{key}: norm kind not recognised, no smoothing pair")
                elif raw.norm_issues.get(key):
                    notes[i].append(f"{key}: its output is also read by {raw.norm_issues[key][0]}, no smoothing pair")
                else:
                    pairs[i].append(PairSpec("qkv" if side == "q/k/v" else "up", key, tuple(names)))
        flat = [(i, p) for i, ps in enumerate(pairs) for p in ps]
        if flat and not self.exact(flat):
            for key in dict.fromkeys(p.prev for _, p in flat):
                group = [(i, p) for i, p in flat if p.prev == key]
                if not self.exact(group):
                    for i, p in group:
                        pairs[i].remove(p)
                        notes[i].append(f"{key}: folding a scale into it changes the output (verified), no pair")
        return pairs, notes

    # producer -> writer
    def writer_pairs(self, kind: str) -> tuple[list[list[PairSpec]], list[list[str]]]:
        pairs = [[] for _ in self.raws]
        notes = [[] for _ in self.raws]
        inst = [(i, w) for i, r in enumerate(self.raws) for w in ([r.topo["o"]] if kind == "o" else r.topo["downs"])]
        for tpl in dict.fromkeys(template(w) for _, w in inst):
            group = [(i, w) for i, w in inst if template(w) == tpl]
            first = next(((i, w) for i, w in group if self.raws[i].writer_feeds.get(w)), None)
            if first is None:
                continue
            i0, w0 = first
            feeds = self.raws[i0].writer_feeds[w0]
            mods = {n: self.mod(i0, n) for n in [w0, *feeds]}
            cands = o_candidates(mods, w0, feeds, self.hd, self.kv_heads) if kind == "o" else \
                down_candidates(mods, w0, feeds)
            found = None
            for c in cands:
                trial = [(i, _instantiate(replace(c, targets=(w,)), w)) for i, w in group]
                trial = [(i, p) for i, p in trial if _exists(self, i, p)]
                if self.exact(trial):
                    found = trial
                    break
            if found is None:
                what = "v -> o" if kind == "o" else f"{', '.join(template(f) for f in feeds)} -> {tpl}"
                for i in dict.fromkeys(i for i, _ in group):
                    notes[i].append(f"{what}: no exact scaling pair (a scale does not pass through what lies between; "
                                    f"{len(cands)} candidate(s) tried)")
                continue
            for i, p in found:
                pairs[i].append(p)
        return pairs, notes

    def kv(self) -> list[tuple[str, ...]]:
        keys = list(self.out.keys()) if hasattr(self.out, "keys") else []
        cache = self.out["cache"] if "cache" in keys else self.out["past_key_values"] if "past_key_values" in keys else None
        per: list[tuple[str, ...]] = [() for _ in self.lays]
        for i, cl in enumerate((getattr(cache, "layers", None) or [])[: len(self.lays)]):
            names = []
            for t in (getattr(cl, "keys", None), getattr(cl, "values", None)):
                if isinstance(t, torch.Tensor):
                    mats, _ = self.tr.ancestors(id(t), len(self.g.nodes), self.lays[i])
                    names += [self.lays[i].rel(self.g.nodes[m].name) for m in sorted(mats)]
            per[i] = tuple(dict.fromkeys(names))
        return [kv or self.kv_from_products(i) for i, kv in enumerate(per)]

    def kv_from_products(self, i: int) -> tuple[str, ...]:
        """Without a KV cache: the matrices behind the key/value side of the attention products
        (the second operand of q kᵀ and of probs · v; sdpa's key and value)."""
        lay, g, names = self.lays[i], self.g, []
        readers = set(self.raws[i].topo["readers"])
        for k in range(lay.lo, lay.hi):
            n = g.nodes[k]
            if n.kind != "op" or n.name not in ("matmul", "__matmul__", "bmm", "scaled_dot_product_attention"):
                continue
            for t in n.ins[1:3] if n.name == "scaled_dot_product_attention" else n.ins[1:2]:
                mats, _ = self.tr.ancestors(t, k, lay)
                names += [lay.rel(g.nodes[m].name) for m in sorted(mats) if lay.rel(g.nodes[m].name) in readers]
        order = {r: j for j, r in enumerate(self.raws[i].topo["readers"])}
        return tuple(sorted(dict.fromkeys(names), key=order.get))


def _exists(b: Builder, i: int, p: PairSpec) -> bool:
    return all(f"{b.layers_path}.{i}.{n}" in b.mods for n in (p.prev, *p.targets))


def _expand(names: list[str], model: nn.Module, layer_path: str) -> list[str]:
    return _expand_experts(names, model, layer_path)


def _order(names: list[str]) -> list[str]:
    """Readers that see every token first (their input statistics stand for the pair's), experts after."""
    return [n for n in names if not EXPERT.search(n)] + [n for n in names if EXPERT.search(n)]


def _node_of(g, name: str) -> int | None:
    return next((k for k, n in enumerate(g.nodes) if n.kind == "module" and n.name == name), None)


def build_spec(model: nn.Module) -> ArchSpec:
    b = Builder(model)
    g, tr = b.g, b.tr
    embed = _module_name(model, model.get_input_embeddings())
    head = _module_name(model, model.get_output_embeddings())
    if embed is None or head is None:
        raise UnsupportedArchitecture("no input embedding or output head (get_input/output_embeddings)")
    k_head = _node_of(g, head)
    kind, p = tr.source(g.nodes[k_head].ins[0], k_head, set()) if k_head is not None else ("none", None)
    final_norm = g.nodes[p].name if kind == "module" and is_norm(b.mods[g.nodes[p].name]) else None
    norm_paths = [f"{lay.path}.{r.topo[k]}" for lay, r in zip(b.lays, b.raws) for k in ("attn_norm", "mlp_norm")
                  if r.topo[k]] + ([final_norm] if final_norm else [])
    kinds = {n: norm_kind(b.mods[n]) for n in dict.fromkeys(norm_paths)}
    kinds.update({f"{lay.path}.{k}": norm_kind(b.mods[f"{lay.path}.{k}"])
                  for lay, r in zip(b.lays, b.raws) for k in r.norm_sources if k})
    found = {k for k in (kinds[n] for n in dict.fromkeys(norm_paths)) if k}
    npairs, nnotes = b.norm_pairs(kinds)
    opairs, onotes = b.writer_pairs("o")
    dpairs, dnotes = b.writer_pairs("down")
    kv = b.kv()
    topos, seen = [], {}
    for i, raw in enumerate(b.raws):
        reads = tuple((k, tuple(_order(_expand(v, model, b.lays[i].path)))) for k, v in raw.norm_sources.items())
        t = LayerTopo(**raw.topo, kv=kv[i], reads=reads, pairs=tuple(npairs[i] + dpairs[i] + opairs[i]),
                      notes=tuple(nnotes[i] + onotes[i] + dnotes[i]))
        topos.append(seen.setdefault(t, t))
    emb = b.mods[embed]
    k_emb = _node_of(g, embed)
    x0 = g.tensors[g.spans[[s.name for s in g.spans].index(f"{b.layers_path}.0")].ins[0]]
    ids = g.tensors[g.nodes[k_emb].ins[0]] if k_emb is not None else b.ids
    hw = getattr(b.mods[head], "weight", None)
    notes = [f"routers kept in high precision: {', '.join(dict.fromkeys(r for t in topos for r in t.routers))}"] \
        if any(t.routers for t in topos) else []
    return ArchSpec(family=model.config.model_type, layers=b.layers_path, embed=embed, final_norm=final_norm,
                    lm_head=head, norm_kind=found.pop() if len(found) == 1 else ("mixed" if found else "unknown"),
                    layer_topos=tuple(topos), tied=hw is not None and hw is getattr(emb, "weight", None),
                    embed_scale=_embed_scale(model, emb, ids, x0), head_dim=b.hd, n_heads=b.h,
                    n_kv_heads=b.kv_heads, norm_kinds=tuple(kinds.items()), notes=tuple(notes))


def trace_architecture(model: nn.Module) -> ArchSpec:
    """Unfuse MoE experts (in place, function unchanged), trace, verify: the model's ArchSpec, or one line."""
    fam = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
    try:
        unfuse_experts(model)
        fused = fused_expert_modules(model)
        if fused:
            raise UnsupportedArchitecture(f"experts stored as fused 3-D tensors of an unknown layout in {fused[0]}")
        return build_spec(model)
    except UnsupportedArchitecture as e:
        raise UnsupportedArchitecture(f"cannot map architecture '{fam}': {e}") from None
    except Exception as e:  # noqa: BLE001 - a model the tracer cannot run: one line, never a traceback
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise UnsupportedArchitecture(f"cannot map architecture '{fam}': tracing failed ({type(e).__name__}: "
                                      f"{first})") from None
