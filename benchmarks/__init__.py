"""Latency and memory benchmarks: engines vs eager PyTorch, against the FLOP floor."""
