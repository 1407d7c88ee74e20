"""Backends: what turns the plan's linears into quantized modules. `simulated` (fake-quant in float,
bit-exact grids) is one backend among the real kernels (bitsandbytes, optimum-quanto, gguf).

Each public module here defines a Backend subclass (quantbench.quant.plugin.Backend) with typed
Options and `supports(plan, names) -> None | reason`, and registers it with
`@BACKENDS.register("<name>")` (quantbench.quant.spec.BACKENDS). A backend that cannot run in this
environment raises BackendUnavailable at apply time and the sweep records the row as skipped.
"""
from ..plugin import BackendUnavailable

__all__ = ["BackendUnavailable"]
