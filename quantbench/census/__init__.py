"""Systematic-outlier census (activation, weight and attention outliers, token classes, lifecycle,
linkage, pre-quantized weights). See docs/census.md."""
from .core import run_census
from .report import write_census

__all__ = ["run_census", "write_census"]
