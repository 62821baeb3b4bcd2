"""Named presets: functions that return a complete `Config`. Variants copy a base and change a few fields.

The three 70B presets reproduce verl's `examples/tuning/70b` scripts (qwen2-70b_grpo_32_h20_fsdp_vllm.sh,
qwen2-70b_grpo_32_h800_fsdp_vllm.sh, qwen2-72b_grpo-lora_8_h100_fsdp_vllm.sh at volcengine/verl b178a3cd) with
their hyperparameters. Where we differ by design:
- rollout tensor parallelism stays inside a node (the seeds use TP=16 across two nodes); the planner picks it;
- the layout (colocated as the seeds, or trainer and rollout GPUs of their own), activation checkpointing and
  offload are the planner's choice from its step-time and memory models (the seeds switch every saving on); an
  engine takes at most 0.85 of its GPU, less where a colocated trainer keeps state beside it;
- the H20 seed reads an undefined `$data_path`; we use the H800 seed's GSM8K file.
Every preset uses verl's AdamW defaults (weight decay 0.01, `actor.optim.weight_decay`), which the seeds inherit.
`model.path` and `data.train_path` name the seeds' files; point them at yours with --set.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from grpo.config import (AlgoConfig, Config, ConfigError, DataConfig, JobConfig, ModelConfig, RolloutConfig,
                         TrainConfig)


def local() -> Config:
    """The whole loop on a laptop CPU: the tiny Qwen2, the `repeat` toy task, one trainer and one rollout process."""
    return Config(
        name="local",
        data=DataConfig(task="repeat", prompts_per_step=8, max_prompt_len=16),
        rollout=RolloutConfig(engine="native", n=8, max_new_tokens=8, temperature=1.0, sync_bucket_mb=1),
        algo=AlgoConfig(kl_coef=0.001, kl_kind="low_var_kl", agg="token-mean"),
        train=TrainConfig(steps=300, lr=3e-3, weight_decay=0.01, warmup_steps=0, grad_clip=1.0, seed=0),
        job=JobConfig(executor="local", trainer_ranks=1, rollout_ranks=1, time_limit_min=15),
    )


def cpu_slurm() -> Config:
    """The local run as a Slurm job over two nodes: the trainer on one, the rollout engine on the other."""
    cfg = local()
    cfg.name = "cpu-slurm"
    cfg.job = dataclasses.replace(cfg.job, executor="slurm", nodes=2, time_limit_min=30)
    return cfg


def h800x32() -> Config:
    """Qwen2-72B-Instruct, full-parameter GRPO on 4 nodes x 8 H800 (80 GB), everything offloaded."""
    return Config(
        name="h800x32",
        model=ModelConfig(path="~/models/Qwen2-72B-Instruct", arch="Qwen2-72B", dtype="bfloat16"),
        data=DataConfig(task="dataset", train_path="~/data/rlhf/gsm8k/train.parquet", prompts_per_step=1024,
                        max_prompt_len=512),
        rollout=RolloutConfig(engine="vllm", n=5, max_new_tokens=512, temperature=1.0, max_num_seqs=256),
        algo=AlgoConfig(kl_coef=0.001, kl_kind="low_var_kl", entropy_coef=0.0, agg="token-mean"),
        train=TrainConfig(steps=100, lr=1e-6, weight_decay=0.01, mini_batches=4, max_tokens_per_gpu=24000, checkpoint_every=20),
        job=JobConfig(executor="slurm", gpu_type="h800", nodes=4, gpus_per_node=8, trainer_ranks=0,
                      time_limit_min=24 * 60, cpus_per_task=8, host_mem_gb=1024,
                      signal_delay_s=900),  # a 0.9 TB checkpoint at 1 GB/s per node (hpc.checks.check_lead_time)
    )


def h20x32() -> Config:
    """The same run on 4 nodes x 8 H20 (96 GB)."""
    cfg = h800x32()
    cfg.name = "h20x32"
    cfg.job.gpu_type = "h20"
    return cfg


def h100x8_lora() -> Config:
    """Qwen2.5-72B-Instruct, GRPO with LoRA r=32, alpha=32 on all linear layers, 1 node x 8 H100 (80 GB)."""
    return Config(
        name="h100x8-lora",
        model=ModelConfig(path="~/models/Qwen2.5-72B-Instruct", arch="Qwen2.5-72B", dtype="bfloat16",
                          lora_rank=32, lora_alpha=32, lora_targets="all-linear"),
        data=DataConfig(task="dataset", train_path="data/gsm8k/train.parquet", prompts_per_step=176,
                        max_prompt_len=512),
        rollout=RolloutConfig(engine="vllm", n=5, max_new_tokens=1024, temperature=1.0, max_num_seqs=512),
        algo=AlgoConfig(kl_coef=0.001, kl_kind="low_var_kl", entropy_coef=0.001, agg="token-mean"),
        train=TrainConfig(steps=100, lr=3e-5, weight_decay=0.01, mini_batches=1, max_tokens_per_gpu=32768, checkpoint_every=20),
        job=JobConfig(executor="slurm", gpu_type="h100", nodes=1, gpus_per_node=8, trainer_ranks=0,
                      time_limit_min=24 * 60, cpus_per_task=8, host_mem_gb=1024,
                      signal_delay_s=300),  # the frozen 145 GB base is in the checkpoint too
    )


def h100x2() -> Config:
    """Qwen2.5-1.5B full-parameter GRPO on 2 GPUs: one trainer, one native engine."""
    return Config(
        name="h100x2",
        model=ModelConfig(path="~/models/Qwen2.5-1.5B-Instruct", arch="Qwen2.5-1.5B", dtype="bfloat16"),
        data=DataConfig(task="dataset", train_path="data/gsm8k/train.parquet", prompts_per_step=8,
                        max_prompt_len=128),
        rollout=RolloutConfig(engine="native", n=8, max_new_tokens=512, max_num_seqs=64),
        algo=AlgoConfig(kl_coef=0.04, kl_kind="low_var_kl"),
        train=TrainConfig(steps=50, lr=1e-6, weight_decay=0.01, mini_batches=1, max_tokens_per_gpu=16384),
        job=JobConfig(executor="slurm", gpu_type="h100", nodes=1, gpus_per_node=2, trainer_ranks=1,
                      time_limit_min=60, cpus_per_task=8),
    )


def h100x1() -> Config:
    """One GPU: the trainer and the engine processes share it (the TRL-comparison shape)."""
    cfg = h100x2()
    cfg.name = "h100x1"
    cfg.job = dataclasses.replace(cfg.job, gpus_per_node=1, trainer_ranks=1)
    return cfg


PRESETS: dict[str, Callable[[], Config]] = {
    "local": local,
    "cpu-slurm": cpu_slurm,
    "h800x32": h800x32,
    "h20x32": h20x32,
    "h100x8-lora": h100x8_lora,
    "h100x2": h100x2,
    "h100x1": h100x1,
}


def get_preset(name: str) -> Config:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]()
