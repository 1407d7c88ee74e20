"""Structural outlier elimination experiment: small decoder-only LMs trained from scratch, one per
attention variant (quantbench.train.attention), then censused, quantized and compared.
Entry point: quantbench.train.run.run_training (CLI: `quantbench train --config configs/train-cpu.yaml`).
See docs/training.md."""
