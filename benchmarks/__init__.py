"""Side-by-side performance measurements against PyTorch peers (not tests).

Run every benchmark: ``python -m benchmarks.run`` (README, "Benchmarks").
"""
