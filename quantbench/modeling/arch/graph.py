"""One forward pass recorded as a data-flow graph, the raw material of quantbench.modeling.arch.topology.

Every torch function call (a TorchFunctionMode) and every call of an *atomic* module (a linear
layer, a norm, any module owning a 2-D weight such as an MoE router, an embedding) becomes a
node with the ids of the tensors it read and wrote; ops inside an atomic module are folded into
its node. Calls of the other modules (decoder layers, attention, MLP blocks) are kept as spans
(first and last node index, input and output tensor ids). All tensors stay referenced while the
graph lives, so ids are never reused.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from ..surgery import is_linear

# ops that keep every channel where it was (last dim untouched): a reader behind them still reads the source
PASS_THROUGH = {"view", "reshape", "flatten", "contiguous", "to", "float", "type", "type_as", "clone", "detach",
                "dropout", "__getitem__", "index_select", "unsqueeze", "squeeze"}
ADD = {"add", "__add__", "__radd__", "__iadd__", "add_", "sum"}


def is_norm(mod: nn.Module) -> bool:
    return isinstance(mod, (nn.LayerNorm, nn.RMSNorm)) or "norm" in type(mod).__name__.lower()


def owns_matrix(mod: nn.Module) -> bool:
    """A module that applies its own 2-D weight (a linear layer, a router, QuantLinear-like modules)."""
    w = getattr(mod, "weight", None)
    return (is_linear(mod) or (isinstance(w, torch.Tensor) and w.dim() == 2
                               and not isinstance(mod, nn.Embedding) and not is_norm(mod)))


def is_atomic(mod: nn.Module) -> bool:
    return is_linear(mod) or is_norm(mod) or owns_matrix(mod) or isinstance(mod, nn.Embedding)


@dataclass
class Node:
    kind: str  # "op" or "module"
    name: str  # op name, or the module's path
    ins: list[int]
    outs: list[int] = field(default_factory=list)
    shapes: list[tuple[int, ...]] = field(default_factory=list)  # input tensor shapes (ops)


@dataclass
class Span:
    """A non-atomic module call: nodes [first, last), its main input and output tensor ids."""

    name: str
    first: int
    last: int = -1
    ins: list[int] = field(default_factory=list)
    outs: list[int] = field(default_factory=list)


def _tensors(obj) -> list[torch.Tensor]:
    return [t for t in tree_flatten(obj)[0] if isinstance(t, torch.Tensor)]


class Graph:
    """The recorded graph: nodes in call order, spans of non-atomic modules, tensors by id."""

    def __init__(self) -> None:
        self.nodes: list[Node] = []
        self.spans: list[Span] = []
        self.tensors: dict[int, torch.Tensor] = {}
        self.producers: dict[int, list[int]] = {}  # tensor id -> node indices that wrote it
        self.consumers: dict[int, list[int]] = {}  # tensor id -> node indices that read it

    def keep(self, ts: list[torch.Tensor]) -> list[int]:
        for t in ts:
            self.tensors[id(t)] = t
        return [id(t) for t in ts]

    def add(self, node: Node) -> int:
        i = len(self.nodes)
        self.nodes.append(node)
        for t in node.ins:
            self.consumers.setdefault(t, []).append(i)
        for t in node.outs:
            self.producers.setdefault(t, []).append(i)
        return i

    def producer(self, tid: int, before: int | None = None) -> int | None:
        """The last node (before index `before`) that wrote tensor tid."""
        cands = [i for i in self.producers.get(tid, []) if before is None or i < before]
        return cands[-1] if cands else None

    def width(self, tid: int) -> int | None:
        t = self.tensors.get(tid)
        return int(t.shape[-1]) if t is not None and t.dim() else None


class _Recorder(TorchFunctionMode):
    def __init__(self, graph: Graph):
        super().__init__()
        self.g, self.atomic_depth = graph, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.atomic_depth:
            return out
        name = getattr(func, "__name__", str(func))
        if name == "__get__":
            return out
        outs = _tensors(out)
        if outs:
            ins = _tensors((args, kwargs))
            self.g.add(Node("op", name, self.g.keep(ins), self.g.keep(outs), [tuple(t.shape) for t in ins]))
        return out


def _main_input(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    if args and isinstance(args[0], torch.Tensor):
        return [args[0]]
    for key in ("hidden_states", "x", "input", "input_ids", "inputs_embeds"):
        if isinstance(kwargs.get(key), torch.Tensor):
            return [kwargs[key]]
    return _tensors((args, kwargs))[:1]


@torch.no_grad()
def record(model: nn.Module, input_ids: torch.Tensor, use_cache: bool | None = True) -> tuple[Graph, object]:
    """Run model(input_ids) once, recording the graph; returns (graph, model output)."""
    g, rec = Graph(), None
    rec = _Recorder(g)
    handles, open_atomic, open_spans = [], {}, {}
    names = {id(m): n for n, m in model.named_modules()}

    def pre(mod, args, kwargs):
        name = names.get(id(mod), "?")
        if is_atomic(mod):
            if rec.atomic_depth == 0:
                open_atomic[id(mod)] = Node("module", name, g.keep(_tensors((args, kwargs))))
            rec.atomic_depth += 1
        else:
            sp = Span(name, len(g.nodes), ins=g.keep(_main_input(args, kwargs)))
            open_spans.setdefault(id(mod), []).append(sp)

    def post(mod, args, kwargs, out):
        if is_atomic(mod):
            rec.atomic_depth -= 1
            if rec.atomic_depth == 0:
                node = open_atomic.pop(id(mod))
                node.outs = g.keep(_tensors(out))
                g.add(node)
        else:
            sp = open_spans[id(mod)].pop()
            sp.last, sp.outs = len(g.nodes), g.keep(_tensors(out)[:1])
            g.spans.append(sp)

    for mod in model.modules():
        handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(mod.register_forward_hook(post, with_kwargs=True))
    try:
        with rec:
            kw = {} if use_cache is None else {"use_cache": use_cache}
            out = model(input_ids=input_ids, **kw)
    finally:
        for h in handles:
            h.remove()
    return g, out
