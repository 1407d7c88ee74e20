"""quantbench: how compressible is a causal LM checkpoint, why, and which recipe to ship."""
import logging as _logging

__version__ = "0.2.0"

# transformers imports torchao when it is installed (a test-time reference for our grids); its
# import prints warnings about CUDA-only kernels and enum registration that say nothing about a run.
for _name in ("torchao", "torch.utils._pytree"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)
