"""Moved to quantbench.quant.gguf_quant (the gguf backend in the quant layer simulates with it; the
package's layering forbids quant -> export). Kept so existing imports work."""
from ..quant.gguf_quant import *  # noqa: F401,F403
from ..quant.gguf_quant import _package_can_quantize, _qtype_enum  # noqa: F401
