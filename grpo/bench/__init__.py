"""Benchmarks: `python -m grpo.bench.loop` (whole GRPO steps of the real loop, beside TRL), `grpo.bench.decode` (the
native decode step against the HBM roofline), `grpo.bench.train` (update variants), `grpo.bench.sync` (weight sync).
The loop benchmark runs the loop itself (`grpo.train_step` inside), never a copy of it."""
