"""Benchmarks, run with ``python -m nm_sparse_jax bench {masks,step}``; they print ratios
measured side by side in one run and never assert timings."""
