"""Retrofit experiment (issue 25): graft structural alternatives to softmax attention onto a pretrained
Llama-family model, each initialised so the model's function is (nearly) unchanged at step 0, continue
training every variant and an unchanged control on the same calibration tokens, and measure held-out
loss, the outlier probes and the quantization sweep along the way. See docs/training.md.

Layer 1 (model definitions, loadable checkpoints): `grafts` (the grafted attention modules) and
`model` (the HF-registered model type `quantbench_retrofit` and `graft()`). Layer 5 (orchestration):
`config`, `loop`, `probes`, `report`, `run`. This `__init__` imports nothing, so the model loader can
import `model` without pulling in the orchestration.
"""
