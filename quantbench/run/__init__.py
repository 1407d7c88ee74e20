"""The run: config, manifest, run directory, executors and the sweep pipeline."""
