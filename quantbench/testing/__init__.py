"""Tiny models of every family and the coverage matrix: used by the tests and the doc generators, not by a run."""
