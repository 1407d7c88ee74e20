"""The data an architecture trace produces (quantbench.modeling.arch.topology / quantbench.modeling.arch.pairs): a smoothing
pair, one decoder layer's topology, the model's ArchSpec. Paths in a LayerTopo are relative to its
decoder layer; an ArchSpec holds the model-level paths and one LayerTopo per layer (equal layers
share one object). The properties `attn`, `qkv`, `o`, `up`, `down`, ... describe layer 0, as the old
hand table did (tests keep that table as a cross-check)."""
from __future__ import annotations

from dataclasses import dataclass, field

NORM_KINDS = ("rms", "rms+1", "layer")  # x/rms(x) * w;  x/rms(x) * (1 + w) (Gemma);  (x - mean)/std * w + b


@dataclass(frozen=True)
class PairSpec:
    """A smoothing pair, layer-relative: per channel c, `prev`'s output channel c (its output row
    rows[c], or c) is divided by s_c and every target's input column j multiplied by s_index[j]
    (index[j], or j). Verified exact on the traced model (outputs unchanged for random s)."""

    kind: str  # "qkv" (norm -> attention readers), "up" (norm -> MLP readers), "down", "o"
    prev: str  # a norm or a linear
    targets: tuple[str, ...]  # readers; routers included (compensated, never quantized)
    rows: tuple[int, ...] | None = field(default=None, repr=False)  # fused producers: prev's rows carrying them
    index: tuple[int, ...] | None = field(default=None, repr=False)  # GQA: channel carried by each target column


@dataclass(frozen=True)
class LayerTopo:
    attn: str | None  # the attention module (eager attention returns its probabilities)
    attn_norm: str | None  # norm feeding the attention readers (None: they read the residual stream)
    mlp_norm: str | None  # norm feeding the MLP readers (None: parallel block sharing attn_norm, or none)
    qkv: tuple[str, ...]  # linears whose outputs flow into the attention output projection
    o: str | None  # the attention output projection (writes the residual stream)
    up: tuple[str, ...]  # linears whose outputs flow into an MLP writer (every expert's gate/up too)
    downs: tuple[str, ...]  # MLP writers: the down projection, or every expert's and the shared expert's
    readers: tuple[str, ...]  # every module applying a matrix to a norm's output or the residual stream
    routers: tuple[str, ...] = ()  # readers that only decide routing/gating (kept in high precision)
    post_norms: tuple[str, ...] = ()  # norms between a writer and the residual sum (Gemma2/3, OLMo2)
    mlp: str | None = None  # the MLP / MoE block
    experts: tuple[str, ...] = ()  # expert units (MoE), in expert order
    kv: tuple[str, ...] = ()  # linears whose outputs the KV cache stores (k, v)
    reads: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (norm, or "" for the residual itself) -> its readers
    parallel: bool = False  # attention and MLP read the same residual (one norm or two)
    gated: bool = False  # an MLP writer's input is the product of two linear outputs (act(gate) * up)
    pairs: tuple[PairSpec, ...] = ()
    notes: tuple[str, ...] = ()  # what is not exact here, one line each
    residual_issue: str | None = None  # why the residual stream cannot be rotated here (None: it can)
    stream_readers: tuple[str, ...] = ()  # readers of the residual stream itself or of a norm of it

    @property
    def down(self) -> str | None:
        """The dense MLP's writer (None in a mixture-of-experts layer)."""
        return self.downs[0] if len(self.downs) == 1 and not self.experts else None

    def pairs_of(self, kinds: tuple[str, ...]) -> tuple[PairSpec, ...]:
        return tuple(p for p in self.pairs if p.kind in kinds)


@dataclass(frozen=True)
class ArchSpec:
    family: str  # config.model_type
    layers: str  # model-level path of the decoder layer list
    embed: str
    final_norm: str | None
    lm_head: str
    norm_kind: str  # of the residual-stream norms ("rms", "rms+1", "layer", or "mixed")
    layer_topos: tuple[LayerTopo, ...]
    tied: bool = False  # lm_head shares the embedding matrix
    embed_scale: float | None = 1.0  # embeddings are multiplied by this (Gemma: sqrt(hidden)); None: not a scale
    head_dim: int = 0
    n_heads: int = 0
    n_kv_heads: int = 0
    norm_kinds: tuple[tuple[str, str | None], ...] = field(default=(), repr=False)  # model-level norm path -> kind
    notes: tuple[str, ...] = field(default=())

    def norm_kind_of(self, path: str) -> str | None:
        return dict(self.norm_kinds).get(path)

    # layer 0's view, as the old hand table described every family
    @property
    def n_layers(self) -> int:
        return len(self.layer_topos)

    def layer(self, i: int) -> LayerTopo:
        return self.layer_topos[i]

    @property
    def attn(self) -> str | None:
        return self.layer_topos[0].attn

    @property
    def attn_norm(self) -> str | None:
        return self.layer_topos[0].attn_norm

    @property
    def mlp_norm(self) -> str | None:
        return self.layer_topos[0].mlp_norm

    @property
    def qkv(self) -> tuple[str, ...]:
        return self.layer_topos[0].qkv

    @property
    def o(self) -> str | None:
        return self.layer_topos[0].o

    @property
    def up(self) -> tuple[str, ...]:
        return self.layer_topos[0].up

    @property
    def down(self) -> str | None:
        return self.layer_topos[0].down

    @property
    def gated_mlp(self) -> bool:
        """Layer 0's MLP is gated: down's input is act(gate) * up (separate or fused [gate|up] projections)."""
        t = self.layer_topos[0]
        return t.gated or any(p.kind == "down" and p.rows is not None for p in t.pairs)

    @property
    def fused_qkv(self) -> bool:
        t = self.layer_topos[0]
        return len(t.kv) == 1 or any(p.kind == "o" and p.rows is not None for p in t.pairs)

    @property
    def is_moe(self) -> bool:
        return any(t.experts for t in self.layer_topos)

    @property
    def smooth_pairs(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """Layer 0's (previous op, linears it feeds) pairs."""
        return tuple((p.prev, p.targets) for p in self.layer_topos[0].pairs)

    def layer_path(self, i: int, rel: str) -> str:
        return f"{self.layers}.{i}.{rel}"

    def names(self, what: str) -> list[str]:
        """Model-level names of one LayerTopo tuple field (e.g. 'routers', 'kv', 'readers') in every layer."""
        return [self.layer_path(i, r) for i, t in enumerate(self.layer_topos) for r in getattr(t, what)]
