"""quantbench: how compressible is a causal LM checkpoint, why, and which recipe to ship."""

__version__ = "0.1.0"
