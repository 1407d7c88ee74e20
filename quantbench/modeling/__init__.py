"""Load any causal LM; its architecture by tracing, verified smoothing pairs, experts, pre-quantized detection, pristine weights, offload and module surgery."""
