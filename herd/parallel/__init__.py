"""Tensor and expert parallelism: process groups, per-rank workers and the executors (docs/parallel.md)."""
