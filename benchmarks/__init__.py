"""Benchmarks (`ferry bench`): latency and throughput of PyTorch eager vs onnxruntime on CPU and GPU, plus the pytest-benchmark suite."""
