"""Rank bootstrap: the function every task of the job runs.

The task's identity (rank, world size, hosts) comes from submitit's JobEnvironment, which reads SLURM_* (or the
local executor's variables); this is the one place that reads them.
"""

from __future__ import annotations

import faulthandler
import os
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta


@dataclass(frozen=True)
class RankEnv:
    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int
    hostname: str
    job_id: str


def read_rank_env(master_port: int | None) -> RankEnv:
    import submitit

    env = submitit.JobEnvironment()
    hosts = env.hostnames
    addr = "127.0.0.1" if env.cluster == "local" else hosts[0]
    port = master_port or 20000 + int(str(env.job_id).split("_")[0]) % 20000
    return RankEnv(env.global_rank, env.local_rank, env.num_tasks, addr, port, socket.gethostname(),
                   str(env.job_id))


@dataclass
class RankJob:
    """Picklable entry point submitted through submitit: one call per task."""

    config: dict
    plan: dict
    run_dir: str
    master_port: int | None = None

    def __call__(self) -> dict:
        from grpo import stop

        stop.install()  # before the slow imports: a signal now is remembered, not fatal
        renv = read_rank_env(self.master_port)
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        import torch
        import torch.distributed as dist

        from grpo.config import from_dict
        from grpo.loop import Roles, run

        from hpc.plan import apply_settings

        cfg = apply_settings(from_dict(self.config), self.plan)  # the planner's memory settings (Plan.settings)
        device = self.plan["device"]
        if device == "cpu":
            torch.set_num_threads(max(1, cfg.job.cpus_per_task))
        else:
            torch.cuda.set_device(renv.local_rank % torch.cuda.device_count())  # one GPU may serve two ranks
        dist.init_process_group(
            # on GPUs, CPU tensors (offloaded state, gradient norms of host shards) go over gloo
            backend="gloo" if device == "cpu" else "cpu:gloo,cuda:nccl",
            init_method=f"tcp://{renv.master_addr}:{renv.master_port}",
            rank=renv.rank, world_size=renv.world_size,
            timeout=timedelta(seconds=cfg.job.collective_timeout_s),
        )
        deadline = None
        if renv.rank == 0:  # the driver watches the clock too: Slurm sends its warning once per job, not per start
            slurm_job = renv.job_id if self.plan["executor"] == "slurm" else None
            deadline = time.time() + time_left(slurm_job, cfg.job.time_limit_min * 60) - cfg.job.signal_delay_s
        try:
            gpus = self.plan["gpus_per_node"] * self.plan["nodes"]
            roles = Roles(trainers=self.plan["trainers"], rollouts=self.plan["rollouts"], device=device,
                          shared_gpu=device == "cuda" and gpus < renv.world_size,
                          tp=self.plan["tp"] if cfg.rollout.engine != "native" else 1,
                          time_share=self.plan.get("time_share", False),
                          swap_optimizer=self.plan.get("swap_optimizer", False))
            status = run(cfg, roles, self.run_dir, deadline=deadline)
        except BaseException:
            fail_fast()
            raise
        dist.destroy_process_group()
        if status != "done" and self.plan["executor"] == "slurm":
            wait_for_requeue(renv, ask=status == "requeue")
        return {"rank": renv.rank, "host": renv.hostname, "status": status}


def fail_fast() -> None:
    """A rank that raised leaves its peers inside collectives; tearing NCCL down then can block for ever (seen on
    H200s: destroy_process_group hung and the error was never printed). So print the error now, skip the teardown,
    and make sure the process ends: after 60 s a C-level watchdog exits it, even in interpreter shutdown. The job's
    other ranks then fail on a closed connection or the collective timeout, and the scheduler ends the job."""
    traceback.print_exc()
    sys.stderr.flush()
    faulthandler.dump_traceback_later(60, exit=True)


def time_left(slurm_job: str | None, default_s: float) -> float:
    """Seconds this allocation has left (squeue's %L), or `default_s` outside Slurm."""
    if slurm_job is None:
        return default_s
    out = subprocess.run(["squeue", "-h", "-j", slurm_job.split("_")[0], "-o", "%L"], capture_output=True,
                         text=True, timeout=60)
    left = parse_time_left(out.stdout.strip()) if out.returncode == 0 else None
    return default_s if left is None else left


def parse_time_left(text: str) -> int | None:
    """squeue's %L ([days-][hours:]minutes:seconds) in seconds; None for UNLIMITED, NOT_SET or nothing."""
    days, _, clock = text.rpartition("-")
    try:
        parts = [int(x) for x in clock.split(":")]
        return int(days or 0) * 86400 + sum(v * m for v, m in zip(reversed(parts), (1, 60, 3600)))
    except ValueError:
        return None


def wait_for_requeue(renv: RankEnv, *, ask: bool) -> None:
    """After a stop on a signal (the checkpoint is written): rank 0 asks Slurm to requeue the job when the signal
    was the time-limit or preemption warning; then every rank waits for Slurm to end this allocation. Returning
    would mark the task finished and the job done."""
    job_id = renv.job_id.split("_")[0]
    if ask and renv.rank == 0:
        subprocess.run(["scontrol", "requeue", job_id], check=True)
    time.sleep(600)
    raise SystemExit(f"job {job_id} was not ended by Slurm within 10 minutes of the stop")
