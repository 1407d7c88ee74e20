"""Systematic-outlier census (activation, weight and attention outliers)."""
from .residual import run_census

__all__ = ["run_census"]
