"""The formats a linear may take in a mixed recipe, derived from a uniform base recipe.

A weight-only base (e.g. W4A16 g64) gives the ladder base -> its finer and coarser group sizes (g32,
g128: the group sizes vLLM's Marlin kernels run, one step each way) -> W8 per-channel -> FP16 weights;
a base with quantized activations (e.g. W8A8 static) gives base -> the same weights with 16-bit
activations. Option 0 is always the base itself. An option a linear cannot take (a group size that
does not divide its input size) is unavailable for that linear (`Option.fits`).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..core.errors import ConfigError
from ..quant.spec import QuantSpec, Recipe

W8_CH = QuantSpec(bits=8, granularity="channel")


@dataclass(frozen=True)
class Option:
    label: str  # e.g. 'int4/g64/sym | fp', 'int8/channel/sym | fp'
    weights: QuantSpec | None
    activations: QuantSpec | None

    @property
    def is_base(self) -> bool:
        return self.label.startswith("base")

    def fits(self, in_features: int, grid_block: int | None = None) -> bool:
        """Whether a linear with this input size can take the option (its group size divides it). With
        `grid_block` (the checkpoint's weights already sit on a low-bit grid in blocks of that size, as the
        census detects for a GGUF Q4_1 checkpoint), a low-bit option whose groups split those blocks is left
        out too: it would reproduce the checkpoint's own grid, a gain no original model would show."""
        w = self.weights
        if w is None or w.granularity != "group":
            return True
        if grid_block and not self.is_base and w.bits < 8 and grid_block % w.group_size == 0:
            return False
        return in_features % w.group_size == 0


def _label(w: QuantSpec | None, a: QuantSpec | None) -> str:
    return f"{w.short() if w else 'w16'} | {a.short() if a else 'a16'}"


def base_problem(base: Recipe, refine: int = 0) -> str | None:
    """Why the search cannot take `base` (with `refine` passes), or None: what needs no model, so a
    config is refused before any work (config.RunConfig) and not after the whole sweep."""
    if base.weights is None:
        return (f"base recipe '{base.name}' quantizes no weights, so there is nothing to search; pick a quantized "
                "base (e.g. w4a16-g64 or w8a8-tensor-static)")
    if base.kv is not None:
        return f"base recipe '{base.name}' quantizes the KV cache, which the mixed search does not support"
    if refine and base.activations is not None:
        return (f"refine needs a weight-only base ('{base.name}' quantizes activations, whose rounding passes no "
                "gradient); drop refine, or pick a weight-only base such as w4a16-g64")
    return _backend_problem(base)


def _backend_problem(base: Recipe) -> str | None:
    """A real backend that cannot run the base format beside one of the options the search may pick
    (e.g. quanto runs every linear the same way): every plan that moves a linear would fail."""
    if base.backend == "simulated":
        return None
    from ..quant.plan import LinearPlan, Plan
    from ..quant.spec import BACKENDS

    backend = BACKENDS.get(base.backend)()
    for o in _ladder(base)[1:]:
        if o.weights is None and o.activations is None:
            continue  # full precision: the linear leaves the plan, every backend takes that
        lin = {n: LinearPlan(n, w, a, None, base.backend)
               for n, (w, a) in {"a": (base.weights, base.activations), "b": (o.weights, o.activations)}.items()}
        try:
            reason = backend.supports(Plan(base, lin), list(lin))
        except Exception:  # noqa: BLE001 - a backend whose check needs the model: it is checked when the plan is
            reason = None
        if reason:
            return (f"backend {base.backend} of base recipe '{base.name}' cannot run the formats the search moves "
                    f"linears to ({o.label}: {reason.removeprefix('b: ')}); pick a base on the simulated backend")
    return None


def options_for(base: Recipe) -> list[Option]:
    """Option 0 = the base format; then the ways to spend more bits on one linear."""
    why = base_problem(base)
    if why is not None:
        raise ConfigError(f"mixed: {why}")
    return _ladder(base)


def _ladder(base: Recipe) -> list[Option]:
    w, a = base.weights, base.activations
    opts = [Option("base " + _label(w, a), w, a)]
    if a is not None:  # activation ladder: keep this linear's input at 16 bits
        opts.append(Option(_label(w, None), w, None))
        return opts
    if w.bits < 8 and w.granularity == "group":  # one group-size step finer and one coarser
        for g in (w.group_size // 2, w.group_size * 2):
            if g >= 16:
                wg = w.model_copy(update={"group_size": g})
                opts.append(Option(_label(wg, None), wg, None))
    if w.bits < 8:
        opts.append(Option(_label(W8_CH, None), W8_CH, None))
    opts.append(Option(_label(None, None), None, None))
    return opts
