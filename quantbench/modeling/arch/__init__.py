"""Architecture knowledge, found by tracing (quantbench.modeling.arch.topology, quantbench.modeling.arch.pairs) rather than typed per family.

`arch_of(model)` traces the model once (one recorded forward pass on a few tokens, then a few
perturbation passes that verify every smoothing pair is exact) and caches the result on the model
(it travels with copy.deepcopy). The data classes live in quantbench.modeling.arch.spec. An architecture the
tracer cannot map raises UnsupportedArchitecture with one line saying what it could not find.
"""
from __future__ import annotations

import torch.nn as nn

from ...core.errors import UnsupportedArchitecture
from .spec import NORM_KINDS, ArchSpec, LayerTopo, PairSpec

__all__ = ["NORM_KINDS", "ArchSpec", "LayerTopo", "PairSpec", "arch_of", "arch_or_none", "get_module", "decoder_layers"]

_CACHE_ATTR = "_quantbench_arch"


def arch_of(model: nn.Module, refresh: bool = False) -> ArchSpec:
    """The model's traced architecture (cached on the model; `refresh` traces again)."""
    spec = model.__dict__.get(_CACHE_ATTR)
    if spec is None or refresh:
        from .pairs import trace_architecture

        spec = trace_architecture(model)
        model.__dict__[_CACHE_ATTR] = spec
    return spec


def arch_or_none(model: nn.Module) -> ArchSpec | None:
    """The traced ArchSpec, or None (plain quantization needs no architecture knowledge)."""
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
