"""Architecture knowledge as data: where each family keeps its layers, norms and linears.

Paths are relative to the model (top level) or to one decoder layer. Adding a family is adding
a row; an unknown family gets an error naming what is missing.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from .errors import UnsupportedArchitecture


@dataclass(frozen=True)
class ArchSpec:
    layers: str  # model-level path of the decoder layer list
    embed: str
    final_norm: str
    lm_head: str
    attn: str  # layer-level path of the attention module
    attn_norm: str  # norm feeding the attention input
    mlp_norm: str | None  # norm feeding the MLP (None: parallel block sharing attn_norm)
    qkv: tuple[str, ...]  # layer-level linears reading the attention-norm output
    o: str  # attention output projection
    up: tuple[str, ...]  # linears reading the MLP-norm output
    down: str  # MLP output projection (writes the residual stream)
    norm_kind: str = "rms"  # "rms" (no mean subtraction) or "layer"
    gated_mlp: bool = False  # down input = act(gate) * up, so up -> down scaling is exact
    fused_qkv: bool = False

    @property
    def smooth_pairs(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """(previous op, linears it feeds) pairs whose input scale can move into the weights."""
        if self.mlp_norm is None:  # parallel block: one norm feeds attention and MLP alike
            return ((self.attn_norm, self.qkv + self.up),) + self._inner_pairs()
        pairs = [(self.attn_norm, self.qkv)]
        if self.mlp_norm is not None:
            pairs.append((self.mlp_norm, self.up))
        return tuple(pairs) + self._inner_pairs()

    def _inner_pairs(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """up -> down (gated MLPs: down's input is act(gate) * up) and v -> o (separate v projection)."""
        pairs = []
        if self.gated_mlp:
            pairs.append((self.up[-1], (self.down,)))
        if not self.fused_qkv:
            pairs.append((self.qkv[-1], (self.o,)))
        return tuple(pairs)


_LLAMA = ArchSpec(
    layers="model.layers", embed="model.embed_tokens", final_norm="model.norm", lm_head="lm_head",
    attn="self_attn", attn_norm="input_layernorm", mlp_norm="post_attention_layernorm",
    qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), o="self_attn.o_proj",
    up=("mlp.gate_proj", "mlp.up_proj"), down="mlp.down_proj", gated_mlp=True,
)
ARCHS: dict[str, ArchSpec] = {
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA,
    "quantbench_lm": _LLAMA,  # quantbench.train.modeling: Llama module names, any attention variant
    "gpt2": ArchSpec(
        layers="transformer.h", embed="transformer.wte", final_norm="transformer.ln_f", lm_head="lm_head",
        attn="attn", attn_norm="ln_1", mlp_norm="ln_2", qkv=("attn.c_attn",), o="attn.c_proj",
        up=("mlp.c_fc",), down="mlp.c_proj", norm_kind="layer", fused_qkv=True,
    ),
    "opt": ArchSpec(
        layers="model.decoder.layers", embed="model.decoder.embed_tokens",
        final_norm="model.decoder.final_layer_norm", lm_head="lm_head",
        attn="self_attn", attn_norm="self_attn_layer_norm", mlp_norm="final_layer_norm",
        qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), o="self_attn.out_proj",
        up=("fc1",), down="fc2", norm_kind="layer",
    ),
    "gpt_neox": ArchSpec(
        layers="gpt_neox.layers", embed="gpt_neox.embed_in", final_norm="gpt_neox.final_layer_norm",
        lm_head="embed_out", attn="attention", attn_norm="input_layernorm",
        mlp_norm="post_attention_layernorm", qkv=("attention.query_key_value",), o="attention.dense",
        up=("mlp.dense_h_to_4h",), down="mlp.dense_4h_to_h", norm_kind="layer", fused_qkv=True,
    ),
    "phi": ArchSpec(
        layers="model.layers", embed="model.embed_tokens", final_norm="model.final_layernorm",
        lm_head="lm_head", attn="self_attn", attn_norm="input_layernorm", mlp_norm=None,
        qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), o="self_attn.dense",
        up=("mlp.fc1",), down="mlp.fc2", norm_kind="layer",
    ),
}


def arch_of(model: nn.Module) -> ArchSpec:
    mt = getattr(getattr(model, "config", None), "model_type", None)
    if mt not in ARCHS:
        raise UnsupportedArchitecture(
            f"architecture '{mt}' is not described in quantbench.arch.ARCHS (known: {', '.join(sorted(ARCHS))}); "
            "add a row naming its decoder layers, norms, q/k/v, o, up and down projections")
    return ARCHS[mt]


def arch_or_none(model: nn.Module) -> ArchSpec | None:
    """The family's ArchSpec, or None (plain quantization needs no architecture knowledge)."""
    try:
        return arch_of(model)
    except UnsupportedArchitecture:
        return None


def get_module(root: nn.Module, path: str) -> nn.Module:
    try:
        return root.get_submodule(path)
    except AttributeError:
        raise UnsupportedArchitecture(f"module '{path}' not found in {type(root).__name__}") from None


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return get_module(model, arch_of(model).layers)
