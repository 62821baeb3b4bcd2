"""Microbenchmarks of the LM-head kernels against torch and peers: ``python -m kernels.bench --help``."""
