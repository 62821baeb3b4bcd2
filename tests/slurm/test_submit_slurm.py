"""`python -m hpc.submit` against the real local Slurm cluster: a 2-node GRPO job, refusals before submission, a
drained node, the time limit and requeues (resume across allocations), and a rank killed mid-run."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


def submit(tmp_path: Path, *args: str, timeout: int = 600, wait: bool = True):
    argv = [sys.executable, "-m", "hpc.submit", "--preset", "cpu-slurm", "--set", f"out_dir={tmp_path / 'runs'}",
            *args]
    if not wait:
        return subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def run_dir_of(stdout: str) -> Path:
    return Path(re.search(r"^run folder: (.+)$", stdout, re.M).group(1))


def job_id_of(stdout: str) -> str:
    return re.search(r"^job (\d+) submitted", stdout, re.M).group(1)


def hosts(run_dir: Path) -> dict[int, set[str]]:
    """rank -> hosts it ran on (several after a requeue), from the submitit log headers."""
    out: dict[int, set[str]] = {}
    for log in run_dir.glob("logs/*/*_log.out"):
        for host, rank in re.findall(r"hostname=([^,]+),.*global_rank=(\d+)", log.read_text()):
            out.setdefault(int(rank), set()).add(host)
    return out


def steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def queued_jobs() -> set[str]:
    """Job ids in the queue (a job of an earlier test may still be completing: compare sets, not counts)."""
    out = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_two_node_grpo_job_runs_to_completion(tmp_path):
    proc = submit(tmp_path, "--set", "train.steps=12")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "partition cpu" in proc.stdout
    run_dir = run_dir_of(proc.stdout)
    assert steps(run_dir) == list(range(1, 13))
    where = hosts(run_dir)
    assert len(where[0] | where[1]) == 2, where  # trainer and rollout on different slurmd nodes
    assert (run_dir / "reward.png").exists() and (run_dir / "checkpoints" / "step_00000012" / "meta.json").exists()


@pytest.mark.parametrize("args,words", [
    (["--set", "job.nodes=9"], ["needs 9"]),
    (["--set", "job.partition=h800", "--set", "job.nodes=3"], ["partition h800 has 2 node(s)", "needs 3"]),
    (["--set", "job.partition=gpu"], ["no partition 'gpu'"]),
])
def test_impossible_requests_fail_before_submission(tmp_path, args, words):
    before = queued_jobs()
    proc = submit(tmp_path, *args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and all(w in proc.stderr for w in words), proc.stderr
    assert not queued_jobs() - before and not (tmp_path / "runs").exists()


def test_a_gpu_type_the_cluster_lacks(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "hpc.submit", "--preset", "h800x32", "--set", "job.gpu_type=a100",
                           "--set", f"out_dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "gpu:a100:8" in proc.stderr, proc.stderr


def wait_idle(*nodes: str, timeout: float = 60) -> None:
    """Until the nodes have finished the previous tests' jobs (completing -> idle)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = subprocess.run(["sinfo", "-h", "-N", "-n", ",".join(nodes), "-o", "%t"], capture_output=True,
                             text=True).stdout.split()
        if out and all(s == "idle" for s in out):
            return
        time.sleep(0.5)
    raise AssertionError(f"nodes {nodes} did not become idle")


def test_a_drained_node_is_not_chosen(tmp_path):
    wait_idle("cpu-1", "cpu-2")
    subprocess.run(["scontrol", "update", "nodename=cpu-1", "state=drain", "reason=test"], check=True)
    try:
        proc = submit(tmp_path, "--set", "train.steps=2")
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert "skipped node cpu-1: drained" in proc.stdout
        used = set().union(*hosts(run_dir_of(proc.stdout)).values())
        assert "cpu-1" not in used and len(used) == 2
    finally:
        subprocess.run(["scontrol", "update", "nodename=cpu-1", "state=resume"], check=True)


def wait_for_steps(run_dir_glob, count: int, timeout: float) -> Path:
    deadline = time.time() + timeout
    while time.time() < deadline:
        for run_dir in run_dir_glob():
            if (run_dir / "metrics.jsonl").exists() and len(steps(run_dir)) >= count:
                return run_dir
        time.sleep(0.5)
    raise AssertionError(f"no run reached {count} steps in {timeout} s")


@pytest.fixture
def prompt_requeues():
    """Slurm holds a requeued job for about two minutes (reason BeginTime); release our test jobs at once."""
    stop = threading.Event()

    def release():
        while not stop.wait(1.0):
            out = subprocess.run(["squeue", "-h", "-u", "root", "-t", "PD", "-o", "%i %r"], capture_output=True,
                                 text=True).stdout
            for job_id, reason in (line.split() for line in out.splitlines() if line.strip()):
                if reason == "BeginTime":
                    subprocess.run(["scontrol", "update", f"jobid={job_id}", "starttime=now"], capture_output=True)

    thread = threading.Thread(target=release, daemon=True)
    thread.start()
    yield
    stop.set()
    thread.join()


def test_time_limit_saves_requeues_and_resumes(tmp_path, prompt_requeues):
    """A 1-minute limit with the warning 30 s before it: the run saves, requeues itself and finishes in a later
    allocation (or several: each one runs until its own warning)."""
    proc = submit(tmp_path, "--set", "train.steps=400", "--set", "job.time_limit_min=1",
                  "--set", "job.signal_delay_s=30", "--set", "train.checkpoint_every=1000", timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = run_dir_of(proc.stdout)
    assert steps(run_dir) == list(range(1, 401))  # every step once: none lost, none repeated
    log = next(run_dir.glob("logs/*/*_0_log.out")).read_text()
    assert log.count("Starting with JobEnvironment") >= 2 and "resumed from" in log


def test_scontrol_requeue_resumes_without_losing_steps(tmp_path, prompt_requeues):
    follower = submit(tmp_path, "--set", "train.steps=400", "--set", "train.checkpoint_every=50", wait=False)
    run_dir = wait_for_steps(lambda: (tmp_path / "runs").glob("cpu-slurm-*"), 120, timeout=180)
    job_id = next(p.name for p in run_dir.glob("logs/*") if p.name.isdigit())
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    out, err = follower.communicate(timeout=600)
    assert follower.returncode == 0, out[-3000:] + err[-3000:]
    assert steps(run_dir) == list(range(1, 401))
    log = next(run_dir.glob("logs/*/*_0_log.out")).read_text()
    assert log.count("Starting with JobEnvironment") == 2 and "resumed from" in log


def test_a_killed_rank_ends_the_job_and_is_named(tmp_path):
    follower = submit(tmp_path, "--set", "train.steps=5000", wait=False)
    run_dir = wait_for_steps(lambda: (tmp_path / "runs").glob("cpu-slurm-*"), 20, timeout=180)
    # the tasks' Python processes (srun's own command line holds the same words after its options)
    pid = int(subprocess.run(["pgrep", "-f", rf"^\S*python\S* -u -m submitit.core._submit {run_dir}"],
                             capture_output=True, text=True).stdout.split()[-1])
    started = time.time()
    os.kill(pid, signal.SIGKILL)  # one task of the job, whichever pgrep listed last
    out, err = follower.communicate(timeout=300)
    assert time.time() - started < 120
    assert follower.returncode == 1
    assert "failed" in err and re.search(r"rank \d+ on (cpu|h\d+)-\d", err), err
    assert len(steps(run_dir)) < 5000
