"""Named presets: functions that return a complete `Config`. Variants copy a base and change a few fields."""

from __future__ import annotations

from typing import Callable

from grpo.config import AlgoConfig, Config, ConfigError, DataConfig, JobConfig, RolloutConfig, TrainConfig


def local() -> Config:
    """The whole loop on a laptop CPU: the tiny Qwen2, the `repeat` toy task, one trainer and one rollout process."""
    return Config(
        name="local",
        data=DataConfig(task="repeat", prompts_per_step=8, max_prompt_len=16),
        rollout=RolloutConfig(engine="native", n=8, max_new_tokens=8, temperature=1.0, sync_bucket_mb=1),
        algo=AlgoConfig(kl_coef=0.001, kl_kind="low_var_kl", agg="token-mean"),
        train=TrainConfig(steps=300, lr=3e-3, warmup_steps=0, grad_clip=1.0, seed=0),
        job=JobConfig(executor="auto", trainer_ranks=1, rollout_ranks=1, time_limit_min=15),
    )


PRESETS: dict[str, Callable[[], Config]] = {
    "local": local,
}


def get_preset(name: str) -> Config:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]()
