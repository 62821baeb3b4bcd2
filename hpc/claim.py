"""One owner per run folder: an atomic claim file that names the launch and, once submitted, its job.

`hpc.submit` takes the claim (O_CREAT | O_EXCL: of two launches on one folder exactly one wins) before it writes
anything else into the folder, records the job once it is submitted, and gives the claim back when it has seen the
job end. A claim whose owner is gone (the local job's process has exited, the Slurm job has left the queue, the
launching process died before submitting) is stale: the next launch takes it over and says so. Nothing here imports
torch.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from grpo.config import ConfigError

CLAIM = ".owner.json"
# squeue states of a job that still runs or will run again (a requeued job passes through PENDING)
SLURM_LIVE = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD",
              "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED"}


def process_start(pid: int) -> str | None:
    """The start time of process `pid` (field 22 of /proc/PID/stat): with the pid it names one process, even after
    the pid is reused. None when there is no such running process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()
    # a zombie (Z) or dead (X) process has ended; its parent (or a container's init) has not reaped it yet
    return None if fields[0] in ("Z", "X") else fields[19]


def _owner(executor: str, job_id: str | None = None) -> dict:
    pid = int(job_id) if executor == "local" and job_id else os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "start": process_start(pid), "executor": executor,
            "job_id": job_id, "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def describe(owner: dict) -> str:
    if owner.get("job_id"):
        return f"job {owner['job_id']} ({owner.get('executor')}, submitted from {owner.get('host')})"
    return f"the launch with pid {owner.get('pid')} on {owner.get('host')}"


def alive(owner: dict) -> bool | None:
    """Whether the claim's owner still runs: True, False, or None when this machine cannot tell (a local process
    on another host, or Slurm commands missing)."""
    if owner.get("executor") == "slurm" and owner.get("job_id"):
        try:
            p = subprocess.run(["squeue", "-h", "-j", str(owner["job_id"]), "-o", "%T"], capture_output=True,
                               text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            return None
        if p.returncode != 0:  # "Invalid job id specified": slurmctld no longer knows the job
            return False if "invalid job id" in p.stderr.lower() else None
        states = set(p.stdout.split())
        return bool(states & SLURM_LIVE)
    if owner.get("host") != socket.gethostname():
        return None
    pid = owner.get("pid")
    return isinstance(pid, int) and process_start(pid) is not None and process_start(pid) == owner.get("start")


def _create(path: Path, owner: dict) -> bool:
    """Create the claim with its whole content at once: written to a file of our own, then hard-linked to the
    claim's name, which fails if the name exists (atomic, like O_EXCL). With O_EXCL and a write after it, another
    launch could read the claim empty in between and take it for a dead one (a test caught that)."""
    tmp = path.with_name(f"{CLAIM}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(owner))
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink()


def claim(run_dir: Path, *, executor: str) -> None:
    """Take `run_dir` for this launch, or ConfigError (one line) naming the owner that holds it. A stale claim is
    taken over with a note on stderr."""
    path = Path(run_dir) / CLAIM
    for _ in range(10):
        if _create(path, _owner(executor)):
            return
        try:
            raw = path.read_text()
        except FileNotFoundError:
            continue  # given back or taken over meanwhile: try again
        try:
            owner = json.loads(raw)
        except ValueError:
            owner = {}  # not a claim this module wrote (its claims appear whole): nobody to ask
        state = alive(owner) if owner else False
        if state is None:
            raise ConfigError(f"run folder {run_dir} is claimed by {describe(owner)}, which cannot be checked "
                              f"from here; if it no longer runs, delete {path} and try again")
        if state:
            raise ConfigError(f"run folder {run_dir} is in use by {describe(owner)}; wait for it to end (or stop "
                              "it) before launching on this folder again")
        # stale: move it aside atomically; of two launches doing this at once only one rename succeeds
        aside = path.with_name(f"{CLAIM}.stale-{os.getpid()}")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            continue
        if aside.read_text() != raw:  # another launch took it over first and claimed it anew: that claim stands
            os.rename(aside, path)
            continue
        aside.unlink()
        print(f"note: run folder {run_dir} was claimed by {describe(owner) if owner else 'an unreadable claim'}, "
              "which no longer runs; taking it over", file=sys.stderr)
    raise ConfigError(f"could not claim run folder {run_dir}: other launches keep taking it")


def record_job(run_dir: Path, *, executor: str, job_id: str) -> None:
    """After submission the claim names the job (whose liveness outlasts this process), replaced atomically."""
    path = Path(run_dir) / CLAIM
    tmp = path.with_name(CLAIM + ".tmp")
    tmp.write_text(json.dumps(_owner(executor, job_id)))
    os.replace(tmp, path)


def release(run_dir: Path) -> None:
    """Give the claim back (the job has ended)."""
    try:
        (Path(run_dir) / CLAIM).unlink()
    except FileNotFoundError:
        pass
