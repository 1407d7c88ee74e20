"""Errors, logging, the plugin registry, atomic file I/O and hooks that are always removed."""
