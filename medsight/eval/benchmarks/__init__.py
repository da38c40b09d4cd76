"""Benchmark readers: each public format -> ``EvalSample``s (see ``common.py``)."""

from medsight.eval.benchmarks.common import BenchmarkData, BenchmarkFormatError, EvalSample, SkippedEntry

__all__ = ["BenchmarkData", "BenchmarkFormatError", "EvalSample", "SkippedEntry"]
