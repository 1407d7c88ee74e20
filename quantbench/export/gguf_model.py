"""Moved to quantbench.quant.gguf_model (shared by the gguf backend and the GGUF writer; the package's
layering forbids quant -> export). Kept so existing imports work."""
from ..quant.gguf_model import *  # noqa: F401,F403
from ..quant.gguf_model import _lookup, _tied  # noqa: F401
