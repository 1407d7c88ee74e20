"""Sequential (layer-by-layer) calibration, as reference GPTQ and llm-compressor's sequential pipeline:

    capture the inputs of decoder layer 0 for every calibration batch (the forward stops there)
    for each decoder layer i:
        on_layer(step)            # e.g. collect statistics of the layer's linears from step.inputs,
                                  # then quantize the layer in place
        run layer i, as it now is, on its inputs -> the inputs of layer i + 1 (replacing them)

Each layer is therefore calibrated on inputs produced by the already-processed layers before it,
and only one layer's inputs are held at a time (hidden states [B, T, D] per batch, plus the keyword
arguments the model passes to its layers: position embeddings, masks, position ids), which is what
calibrating a model larger than memory one layer at a time needs (issue 12).

The arguments a layer is called with are recorded from the model's own forward (transformers 5.x
passes hidden states positionally and the rest as keywords; GPT-2 passes some positionally), with
caching off and any cache object dropped. Families whose layers get different masks by attention
type (full vs sliding, `config.layer_types`) have the arguments recorded at the first layer of each
type; the capture forward stops after the last such layer, so for most families it runs the
embeddings only.

    run_sequential(model, batches, batch_size, device, on_layer)
    step.input_stats(mods, StatsRequest(...))  -> the statistics quantbench.quant.calibration computes,
                                                 for linears of this layer, from its current inputs
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

from ..core.errors import QuantbenchError, UnsupportedArchitecture
from ..core.hooks import first_tensor
from ..modeling.arch import arch_of, get_module
from .calibration import InputStats, StatsRequest, collect_input_stats


class _Stop(Exception):
    """Raised by the capture hook once every needed layer's arguments are recorded."""


@dataclass
class LayerInputs:
    """The current inputs of one decoder layer: per calibration batch, its hidden states and the
    other arguments it is called with (by layer kind: masks may differ between full and sliding
    attention layers)."""

    hidden: list[torch.Tensor]  # per batch [B, T, D]
    args: dict[Any, list[tuple]] = field(default_factory=dict)  # kind -> per batch: other positional args
    kwargs: dict[Any, list[dict]] = field(default_factory=dict)  # kind -> per batch: keyword args

    def n_tensors(self) -> int:
        return len(self.hidden)


@dataclass
class LayerStep:
    """One decoder layer and its current inputs, handed to `on_layer`."""

    index: int
    name: str  # module path, e.g. "model.layers.3"
    layer: nn.Module
    kind: Any  # attention kind (None for families with one kind)
    inputs: LayerInputs
    tokens: torch.Tensor  # the calibration token ids [N, T] (for statistics that sample rows)

    def owns(self, module_name: str) -> bool:
        return module_name.startswith(self.name + ".")

    @torch.no_grad()
    def forward(self) -> None:
        """Run the layer on every batch of its inputs, outputs discarded (for hooks that collect)."""
        args, kwargs = self.inputs.args[self.kind], self.inputs.kwargs[self.kind]
        for h, a, k in zip(self.inputs.hidden, args, kwargs):
            self.layer(h, *a, **k)

    def input_stats(self, mods: dict[str, nn.Module], req: StatsRequest) -> dict[str, InputStats]:
        """Input statistics of `mods` (linears of this layer) from the layer's current inputs."""
        return collect_input_stats(self.layer, mods, self.tokens, 0, torch.device("cpu"), req, forward=self.forward)


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(path, layer list) of a known family; a one-line QuantbenchError otherwise."""
    try:
        path = arch_of(model).layers
        return path, model.get_submodule(path)
    except (UnsupportedArchitecture, AttributeError) as e:
        raise QuantbenchError(f"sequential calibration needs the decoder layers ({e})") from None


def _kinds(model: nn.Module, layers: nn.ModuleList) -> list[Any]:
    """Attention kind per layer: config.layer_types (transformers 5.x), a layer's attention_type, or None."""
    types = getattr(model.config, "layer_types", None)
    if types is not None and len(types) >= len(layers):
        return list(types[: len(layers)])
    return [getattr(layer, "attention_type", None) for layer in layers]


def _no_cache(v: Any) -> Any:
    """Cache objects are dropped from recorded arguments (calibration never caches)."""
    return None if type(v).__name__.endswith("Cache") else v


@torch.no_grad()
def capture_inputs(model: nn.Module, layers: nn.ModuleList, kinds: list[Any], batches: torch.Tensor,
                   batch_size: int, device: torch.device) -> LayerInputs:
    """Layer 0's hidden states and, per layer kind, the arguments of its first layer, per batch."""
    first = {}  # kind -> index of its first layer
    for i, k in enumerate(kinds):
        first.setdefault(k, i)
    last = max(first.values())
    inputs = LayerInputs(hidden=[])
    handles = []

    def hook(i: int):
        def fn(_m, args, kwargs):
            if i == 0:
                inputs.hidden.append(args[0] if args else kwargs["hidden_states"])
            kw = {k: _no_cache(v) for k, v in kwargs.items() if k != "hidden_states"}
            inputs.args.setdefault(kinds[i], []).append(tuple(_no_cache(a) for a in args[1:]))
            inputs.kwargs.setdefault(kinds[i], []).append(kw)
            if i == last:
                raise _Stop
        return fn

    try:
        for i in sorted(set(first.values())):
            handles.append(layers[i].register_forward_pre_hook(hook(i), with_kwargs=True))
        for b in range(0, len(batches), batch_size):
            try:
                model(input_ids=batches[b: b + batch_size].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    return inputs


@torch.no_grad()
def run_sequential(model: nn.Module, batches: torch.Tensor, batch_size: int, device: torch.device,
                   on_layer: Callable[[LayerStep], None], keep_last: bool = False) -> list[torch.Tensor] | None:
    """Call on_layer(step) for each decoder layer with its current inputs, in order; after each call
    the layer (as on_layer left it) is run on its inputs to make the next layer's, which replace them.
    keep_last: return the last layer's outputs (per batch) instead of discarding them."""
    path, layers = decoder_layers(model)
    kinds = _kinds(model, layers)
    inputs = capture_inputs(model, layers, kinds, batches, batch_size, device)
    for i, layer in enumerate(layers):
        step = LayerStep(i, f"{path}.{i}", layer, kinds[i], inputs, batches)
        on_layer(step)
        if i == len(layers) - 1 and not keep_last:
            inputs.hidden.clear()
            break
        args, kwargs = inputs.args[kinds[i]], inputs.kwargs[kinds[i]]
        for b in range(len(inputs.hidden)):  # replace batch by batch: one layer's inputs held, plus one batch
            inputs.hidden[b] = first_tensor(layer(inputs.hidden[b], *args[b], **kwargs[b]))
    return inputs.hidden if keep_last else None


@torch.no_grad()
def sequential_input_stats(model: nn.Module, mods: dict[str, nn.Module], batches: torch.Tensor, batch_size: int,
                           device: torch.device, req: StatsRequest) -> dict[str, InputStats]:
    """collect_input_stats, one decoder layer at a time (config `calibration.mode: sequential`): each
    layer runs on all batches of its inputs with hooks on its own linears, and only one layer's inputs
    are held. On a model no earlier statistic changed, the statistics equal the all-at-once ones (the
    same per-batch computations, accumulated in the same order). The output head's input is the final
    norm of the last layer's outputs; any other module outside the decoder layers is collected by a
    whole-model pass."""
    _, layers = decoder_layers(model)
    owner = {id(m): i for i, layer in enumerate(layers) for m in layer.modules()}
    per_layer: dict[int, dict[str, nn.Module]] = {}
    rest: dict[str, nn.Module] = {}
    for name, mod in mods.items():
        i = owner.get(id(mod))
        (per_layer.setdefault(i, {}) if i is not None else rest)[name] = mod
    out: dict[str, InputStats] = {}

    def on_layer(step: LayerStep) -> None:
        if step.index in per_layer:
            out.update(step.input_stats(per_layer[step.index], req))

    arch = arch_of(model)
    head = get_module(model, arch.lm_head) if arch.lm_head else None
    norm = get_module(model, arch.final_norm) if arch.final_norm else None
    head_only = bool(rest) and head is not None and norm is not None and all(m is head for m in rest.values())
    hidden = run_sequential(model, batches, batch_size, device, on_layer, keep_last=head_only)
    if head_only:
        def forward() -> None:
            for h in hidden:
                head(norm(h))

        out.update(collect_input_stats(model, rest, batches, batch_size, device, req, forward=forward))
    elif rest:
        out.update(collect_input_stats(model, rest, batches, batch_size, device, req))
    return out
