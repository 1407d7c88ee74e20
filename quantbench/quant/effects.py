"""What a mitigation did, declared: everything downstream (the simulated linear, size accounting,
fidelity, export) reads Effects and the per-linear plan, never a mitigation's private state.

- final_weights: linears whose weights a mitigation already put on the plan's grid (GPTQ): the
  backend uses these codes and scales as they are.
- keep: per linear, policies that keep parts of its input in high precision (outlier channels,
  outlier tokens); they are left out of the activation ranges too.
- residual_basis: Q when the residual stream now lives in h @ Q (rotation); fidelity undoes it.
- added_params: parameters a mitigation added or untied (e.g. lm_head untied from the embeddings).
- online: linears whose input passes through an inserted transform (e.g. an online Hadamard);
  the transform's buffers are counted in the size, and export formats that cannot express it refuse.
- side_bits: model-level side tables (e.g. the ids of tokens kept in high precision).
- hooks: forward hooks a mitigation installed (removed when the model is restored).
- gguf_file: the quantized GGUF a backend wrote and the model now holds (llamacpp), kept in a temporary
  folder (`scratch`, removed by cleanup() or when collected) so llama.cpp can score that same file.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from .primitives import QTensor


class KeepPolicy(Protocol):
    """Parts of a linear's input kept in high precision."""

    kind: str  # "channels" or "tokens"

    def mask(self, x: torch.Tensor) -> torch.Tensor | None:
        """bool, broadcastable to x [..., D]: True = keep this element unquantized (None: none kept)."""

    def side_bits(self) -> float:
        """Storage the policy needs besides the weights (e.g. a channel bitmask, a token-id table)."""


@dataclass
class Effects:
    final_weights: dict[str, QTensor] = field(default_factory=dict)
    keep: dict[str, list[KeepPolicy]] = field(default_factory=dict)
    residual_basis: torch.Tensor | None = None
    added_params: list[str] = field(default_factory=list)
    online: dict[str, str] = field(default_factory=dict)
    side_bits: float = 0.0
    hooks: list = field(default_factory=list)
    notes: dict = field(default_factory=dict)
    gguf_file: Path | None = None
    scratch: list = field(default_factory=list)  # tempfile.TemporaryDirectory objects

    def cleanup(self) -> None:
        """Remove the backend's temporary files (gguf_file included)."""
        for d in self.scratch:
            d.cleanup()
        self.scratch.clear()
        self.gguf_file = None

    def merge(self, other: "Effects") -> "Effects":
        """Effects of a later mitigation on top of these (rotations compose: h Q1 Q2)."""
        self.final_weights.update(other.final_weights)
        for k, v in other.keep.items():
            self.keep.setdefault(k, []).extend(v)
        if other.residual_basis is not None:
            self.residual_basis = other.residual_basis if self.residual_basis is None else \
                self.residual_basis @ other.residual_basis
        self.added_params += [p for p in other.added_params if p not in self.added_params]
        self.online.update(other.online)
        self.side_bits += other.side_bits
        self.hooks += other.hooks
        self.notes.update(other.notes)
        self.gguf_file = other.gguf_file or self.gguf_file
        self.scratch += other.scratch
        return self

    def keeps_in_high_precision(self) -> dict[str, str]:
        """linear -> 'channels'/'tokens' kept unquantized (what weight-only export formats cannot hold)."""
        return {n: "+".join(sorted({p.kind for p in ps})) for n, ps in self.keep.items() if ps}

    def remove_hooks(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks.clear()
