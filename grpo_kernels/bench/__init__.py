"""Microbenchmarks of the LM-head kernels against torch and peers: ``python -m grpo_kernels.bench --help``."""
