"""The sbatch script of a plan: a pure function of the config, the plan and the run folder.

No executor object, no PATH lookups, nothing read from the machine: `--dry-run` prints exactly what a submission
hands to sbatch, on a laptop with no Slurm commands. The script has the layout submitit's own renderer gives
(sorted `#SBATCH` flags, srun with one log file per task, the task runner `python -u -m submitit.core._submit
FOLDER`), so that submitit's job object, result files and log paths work unchanged; `hpc.submit` hands this text to
submitit and checks that submitit's runner command is still the one rendered here.
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

from grpo.config import ConfigError

# Each task starts Python with USR2 ignored (an ignored signal stays ignored across exec) until the run installs its
# own handler: Slurm can deliver the time-limit signal the moment a requeued job starts, which would otherwise kill
# the fresh interpreter before it could save anything.
TASK_PYTHON = """bash -c 'trap "" USR2; exec "$0" "$@"' {python}"""
TIME_SIGNAL = "USR2"  # what Slurm sends signal_delay_s before the limit (submitit's choice too)


def log_folder(run_dir: Path | str) -> str:
    """Where submitit keeps the job's pickles and each task's logs (%j: the job id)."""
    return f"{run_dir}/logs/%j"


def task_python(python: str | None = None) -> str:
    return TASK_PYTHON.format(python=shlex.quote(python or sys.executable))


def runner_command(run_dir: Path | str, python: str | None = None) -> str:
    """The command every task runs: submitit's task runner over the job's log folder."""
    return f"{task_python(python)} -u -m submitit.core._submit {shlex.quote(log_folder(run_dir))}"


def sbatch_flags(cfg, plan) -> dict[str, object]:
    """The job's resources as sbatch flags (one task per GPU, or per CPU rank), before the log paths."""
    flags: dict[str, object] = {
        "job-name": f"grpo-{cfg.name}",
        "nodes": plan.nodes,
        "ntasks-per-node": plan.tasks_per_node,
        "cpus-per-task": cfg.job.cpus_per_task,
        "time": cfg.job.time_limit_min,
        "signal": f"{TIME_SIGNAL}@{cfg.job.signal_delay_s}",
        "requeue": True,  # the time-limit and preemption path requeues the job
        "open-mode": "append",  # a requeued job appends to its logs
        "wckey": "submitit",
    }
    if plan.partition:
        flags["partition"] = plan.partition
    # No --nodelist: a requeued job would wait for a pinned node that has since drained. The nodes seen down or
    # drained when planning are excluded instead; Slurm picks among the rest, now and after a requeue.
    if plan.exclude:
        flags["exclude"] = ",".join(plan.exclude)
    if plan.device == "cuda":
        typed = plan.gpu_type and plan.gres_typed  # untyped GRES (gpu:8): a typed request would never match
        flags["gres"] = f"gpu:{plan.gpu_type}:{plan.gpus_per_node}" if typed else f"gpu:{plan.gpus_per_node}"
    job = cfg.job
    for key in ("account", "qos", "constraint", "reservation"):
        if getattr(job, key):
            flags[key] = getattr(job, key)
    if job.mem is not None:
        if not re.fullmatch(r"\d+[KMGT]?", job.mem, re.IGNORECASE):
            raise ConfigError(f"job.mem={job.mem!r} is not a Slurm memory size: a number of MB, or with a unit "
                              "(500G, 512000M), or 0 for all of a node's memory")
        flags["mem"] = job.mem
    if job.exclusive:
        flags["exclusive"] = True
    return flags


def render_sbatch(cfg, plan, run_dir: Path | str, *, python: str | None = None) -> str:
    """The exact script sbatch receives for this plan. Refuses control characters in any value (a newline would
    end a `#SBATCH` line and start a command); everything else is shell-quoted."""
    logs = log_folder(run_dir)
    flags = sbatch_flags(cfg, plan)
    flags["output"] = f"{logs}/%j_0_log.out"
    flags["error"] = f"{logs}/%j_0_log.err"
    lines = ["#!/bin/bash", "", "# Parameters"]
    lines += [_flag(k, flags[k]) for k in sorted(flags)]
    srun = ["srun", "--unbuffered", "--output", f"{logs}/%j_%t_log.out", "--error", f"{logs}/%j_%t_log.err",
            # a task that dies takes the whole job down instead of leaving the others waiting in a collective
            "--kill-on-bad-exit=1"]
    for arg in srun:
        _check_printable("an srun argument", arg)
    command = " ".join([shlex.join(srun), runner_command(run_dir, python)])
    lines += ["", "# command", "export SUBMITIT_EXECUTOR=slurm", command, ""]
    return "\n".join(lines)


def _flag(key: str, value: object) -> str:
    if value is True:
        return f"#SBATCH --{key}"
    _check_printable(f"--{key}", str(value))
    return f"#SBATCH --{key}={shlex.quote(str(value))}"


def _check_printable(what: str, value: str) -> None:
    bad = next((c for c in value if ord(c) < 0x20 or ord(c) == 0x7F), None)
    if bad is not None:
        raise ConfigError(f"{what} {value!r} holds a control character ({bad!r}); it would break the sbatch "
                          "script: remove it")
