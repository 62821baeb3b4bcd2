"""The learning-rate schedule, as verl computes it."""

from __future__ import annotations

from functools import partial

import torch


def warmup_lr_scale(step: int, warmup_steps: int) -> float:
    """verl's constant schedule with warmup (`get_constant_schedule_with_warmup`): s / w for training steps
    s = 0 .. w-1, then 1. The first step of a warmup runs at lr 0, as in verl."""
    return step / max(1, warmup_steps) if step < warmup_steps else 1.0


def build_scheduler(opt: torch.optim.Optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning-rate schedule, stepped once per training step (GRPO step), not per optimizer step, as verl
    does (its `lr_scheduler_step` runs once per `update_actor`, whatever the number of mini-batches)."""
    return torch.optim.lr_scheduler.LambdaLR(opt, partial(warmup_lr_scale, warmup_steps=warmup_steps))
