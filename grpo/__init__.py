"""GRPO trainer: config, losses, rollout and training loop."""
