"""Planning: from a config (and, with Slurm, the live cluster) to ranks, roles and an executor.

Ranks 0..T-1 train (rank 0 drives), ranks T..T+R-1 generate.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass

from grpo.config import Config, ConfigError
from grpo.tasks import TASKS


@dataclass(kw_only=True)
class Plan:
    executor: str  # "local" or "slurm"
    device: str  # "cpu" or "cuda"
    nodes: int
    tasks_per_node: int
    trainers: list[int]
    rollouts: list[int]
    notes: list[str]

    @property
    def world_size(self) -> int:
        return len(self.trainers) + len(self.rollouts)

    def to_dict(self) -> dict:
        return asdict(self)


def slurm_available() -> bool:
    return shutil.which("sbatch") is not None and shutil.which("sinfo") is not None


def check_config(cfg: Config) -> None:
    """Reject combinations no run can satisfy, with a message that says what would work."""
    positive = {"train.steps": cfg.train.steps, "data.prompts_per_step": cfg.data.prompts_per_step,
                "rollout.n": cfg.rollout.n, "rollout.max_new_tokens": cfg.rollout.max_new_tokens,
                "train.mini_batches": cfg.train.mini_batches, "job.trainer_ranks": cfg.job.trainer_ranks,
                "job.rollout_ranks": cfg.job.rollout_ranks, "rollout.sync_bucket_mb": cfg.rollout.sync_bucket_mb}
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key}={value} must be at least 1")
    if cfg.train.lr <= 0:
        raise ConfigError(f"train.lr={cfg.train.lr} must be positive")
    if cfg.rollout.temperature <= 0:
        raise ConfigError(f"rollout.temperature={cfg.rollout.temperature} must be positive")
    if cfg.data.task not in TASKS:
        raise ConfigError(f"data.task={cfg.data.task!r} is not a task; valid tasks: {', '.join(sorted(TASKS))}")
    rows = cfg.data.prompts_per_step * cfg.rollout.n
    per_rank = rows // cfg.job.trainer_ranks
    if rows % cfg.job.trainer_ranks or per_rank % cfg.train.mini_batches:
        raise ConfigError(
            f"{rows} responses per step (data.prompts_per_step x rollout.n) must split evenly over "
            f"job.trainer_ranks={cfg.job.trainer_ranks} and then over train.mini_batches="
            f"{cfg.train.mini_batches}")


def plan_job(cfg: Config) -> Plan:
    check_config(cfg)
    job = cfg.job
    executor = job.executor
    notes = []
    if executor == "auto":
        executor = "slurm" if slurm_available() else "local"
        notes.append("Slurm found: submitting with sbatch" if executor == "slurm"
                     else "no Slurm on this machine: running with submitit's local executor")
    if job.gpu_type is not None:
        raise ConfigError(f"job.gpu_type={job.gpu_type!r}: GPU planning is not available yet; use a CPU preset")
    if executor == "slurm":
        raise ConfigError("job.executor=slurm: Slurm submission is not available yet; use job.executor=local")
    t, r = job.trainer_ranks, job.rollout_ranks
    return Plan(executor=executor, device="cpu", nodes=1, tasks_per_node=t + r,
                trainers=list(range(t)), rollouts=list(range(t, t + r)), notes=notes)


def format_plan(cfg: Config, plan: Plan) -> str:
    d, r = cfg.data, cfg.rollout
    lines = [
        f"plan for preset {cfg.name!r}",
        f"  executor   {plan.executor}: {plan.nodes} node(s) x {plan.tasks_per_node} task(s), {plan.device}, "
        f"{'gloo' if plan.device == 'cpu' else 'nccl'}",
        f"  trainer    ranks {fmt_ranks(plan.trainers)}: FSDP2 policy ({cfg.model.path})"
        + (", frozen reference" if cfg.algo.kl_coef > 0 else ""),
        f"  rollout    ranks {fmt_ranks(plan.rollouts)}: {r.engine} engine",
        f"  batch      {d.prompts_per_step} prompts x {r.n} samples, {r.max_new_tokens} new tokens, "
        f"{cfg.train.mini_batches} mini-batch(es), {cfg.train.steps} steps, task {d.task!r}",
    ]
    lines += [f"  note       {n}" for n in plan.notes]
    return "\n".join(lines)


def fmt_ranks(ranks: list[int]) -> str:
    return f"{ranks[0]}" if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
