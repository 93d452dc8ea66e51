"""Benchmarks: `python -m benchmarks NAME [--size N]`, project vs baseline in the same run."""
