"""Early stops of a Slurm job (issue 13), on the real local cluster: a cancelled job says where it stopped and how
to continue, the follower's Ctrl-C leaves the job running and says so, the run folder has one owner while it runs,
and a time limit shorter than the signal delay never reaches sbatch."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.slurm.test_submit_slurm import job_id_of, queued_jobs, steps, submit, wait_for_steps

ROOT = Path(__file__).parents[2]
STOPPED = re.compile(r"stopped at step (\d+) of (\d+); continue with `--run-dir (\S+) --resume`")


def in_queue(job_id: str) -> bool:
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True).stdout
    return bool(out.strip()) and "COMPLETED" not in out and "CANCELLED" not in out


def wait_gone(job_id: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while in_queue(job_id):
        assert time.time() < deadline, f"job {job_id} still in the queue"
        time.sleep(0.5)


def test_scancel_saves_and_says_how_to_continue(tmp_path):
    follower = submit(tmp_path, "--set", "train.steps=5000", wait=False)
    run_dir = wait_for_steps(lambda: (tmp_path / "runs").glob("cpu-slurm-*"), 5, timeout=180)
    job_id = next(p.name for p in run_dir.glob("logs/*") if p.name.isdigit())
    subprocess.run(["scancel", job_id], check=True)  # SIGTERM to every task, SIGKILL after KillWait
    out, err = follower.communicate(timeout=300)
    assert follower.returncode == 3, out[-2000:] + err[-2000:]
    m = STOPPED.search(err)
    assert m and f"job {job_id} was cancelled" in err and m.group(2) == "5000" and m.group(3) == str(run_dir), err
    k = int(m.group(1))
    assert k >= 5 and (run_dir / "checkpoints" / f"step_{k:08d}" / "meta.json").exists()
    assert steps(run_dir) == list(range(1, k + 1))


def test_ctrl_c_of_the_follower_leaves_the_job_running_and_owning_its_folder(tmp_path):
    argv = [sys.executable, "-m", "hpc.submit", "--preset", "cpu-slurm", "--set", f"out_dir={tmp_path / 'runs'}",
            "--set", "train.steps=5000"]
    follower = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    run_dir = wait_for_steps(lambda: (tmp_path / "runs").glob("cpu-slurm-*"), 3, timeout=180)
    os.killpg(follower.pid, signal.SIGINT)
    out, err = follower.communicate(timeout=60)
    job_id = job_id_of(out)
    try:
        assert follower.returncode == 130, err
        assert f"job {job_id} runs on in Slurm" in err and f"scancel {job_id}" in err
        assert in_queue(job_id)
        again = subprocess.run([*argv[:-2], "--set", "train.steps=5000", "--run-dir", str(run_dir), "--resume"],
                               cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert again.returncode == 2 and f"in use by job {job_id} (slurm" in again.stderr, again.stderr
        before = len(steps(run_dir))
        time.sleep(3)
        assert len(steps(run_dir)) > before  # it still trains
    finally:
        subprocess.run(["scancel", job_id])
    wait_gone(job_id)
    # the job has left the queue: its claim is stale and the next launch takes the folder over
    resumed = subprocess.run([*argv[:-2], "--set", f"train.steps={len(steps(run_dir)) + 2}", "--run-dir",
                              str(run_dir), "--resume"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "no longer runs; taking it over" in resumed.stderr
    assert steps(run_dir) == list(range(1, len(steps(run_dir)) + 1))


def test_a_time_limit_shorter_than_the_signal_delay_is_not_submitted(tmp_path):
    before = queued_jobs()
    proc = submit(tmp_path, "--set", "job.time_limit_min=1", "--set", "job.signal_delay_s=90")
    assert proc.returncode == 2 and "job.signal_delay_s=90" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not queued_jobs() - before and not (tmp_path / "runs").exists()
