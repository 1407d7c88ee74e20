"""Offline assets from the package registries, corpora, windows and calibration batches, the task pack."""
