"""Benchmarks of the rollout side: `python -m grpo.bench.sync` (weight sync), `python -m grpo.bench.step` (a GRPO step)."""
