"""Rank bootstrap: the function every task of the job runs.

The task's identity (rank, world size, hosts) comes from submitit's JobEnvironment, which reads SLURM_* (or the
local executor's variables); this is the one place that reads them.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
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
        renv = read_rank_env(self.master_port)
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        import torch
        import torch.distributed as dist

        from grpo.config import from_dict
        from grpo.loop import Roles, run

        cfg = from_dict(self.config)
        device = self.plan["device"]
        if device == "cpu":
            torch.set_num_threads(max(1, cfg.job.cpus_per_task))
        else:
            torch.cuda.set_device(renv.local_rank % torch.cuda.device_count())  # one GPU may serve two ranks
        dist.init_process_group(
            backend="gloo" if device == "cpu" else "nccl",
            init_method=f"tcp://{renv.master_addr}:{renv.master_port}",
            rank=renv.rank, world_size=renv.world_size,
            timeout=timedelta(seconds=cfg.job.collective_timeout_s),
        )
        try:
            roles = Roles(trainers=self.plan["trainers"], rollouts=self.plan["rollouts"], device=device)
            status = run(cfg, roles, self.run_dir)
        finally:
            dist.destroy_process_group()
        if status == "requeue" and self.plan["executor"] == "slurm":
            requeue(renv)
        return {"rank": renv.rank, "host": renv.hostname, "status": status}


def requeue(renv: RankEnv) -> None:
    """Put the job back in the queue; the new allocation resumes from the checkpoint just written.

    Rank 0 asks Slurm; every rank then waits to be stopped by it (returning would mark the task finished).
    """
    job_id = renv.job_id.split("_")[0]
    if renv.rank == 0:
        subprocess.run(["scontrol", "requeue", job_id], check=True)
    time.sleep(600)
    raise SystemExit(f"job {job_id} was not requeued within 10 minutes")
