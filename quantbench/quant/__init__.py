"""Quantization: spec and per-linear plan, primitives, calibration, mitigations, backends and formats."""
