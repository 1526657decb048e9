"""Benchmarks: latency and throughput of the exported models (issue: benchmarks). Stub until then."""
