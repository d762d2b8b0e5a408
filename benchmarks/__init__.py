"""Latency and memory benchmarks (not built yet)."""
