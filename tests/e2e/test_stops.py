"""The catalogue of issue 13, run side, on real local runs of `python -m hpc.submit` (submitit's local executor):
one owner per run folder, Ctrl-C and SIGTERM of the command, an early stop and its message, a resume with no
checkpoint, a corrupt checkpoint, a killed rank and a full disk."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
STOPPED = re.compile(r"stopped at step (\d+) of (\d+); continue with `--run-dir (\S+) --resume`")


def start(run_dir: Path, *sets: str, resume: bool = False) -> subprocess.Popen:
    """The command in a session of its own, as a terminal runs it: Ctrl-C reaches its whole process group."""
    argv = [sys.executable, "-m", "hpc.submit", "--preset", "local", "--run-dir", str(run_dir)]
    for s in sets:
        argv += ["--set", s]
    argv += ["--resume"] if resume else []
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def run(run_dir: Path, *sets: str, resume: bool = False) -> subprocess.CompletedProcess:
    p = start(run_dir, *sets, resume=resume)
    out, err = p.communicate(timeout=600)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


def wait_for_steps(run_dir: Path, count: int, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while len(steps(run_dir)) < count:
        assert time.time() < deadline, f"{run_dir} did not reach {count} steps"
        time.sleep(0.3)


def rank_log(run_dir: Path, suffix: str = "err") -> str:
    return "".join(p.read_text() for p in sorted(run_dir.glob(f"logs/*/*_0_log.{suffix}")))


def test_ctrl_c_saves_stops_and_resumes_without_repeating_a_step(tmp_path):
    run_dir = tmp_path / "run"
    p = start(run_dir, "train.steps=5000")
    wait_for_steps(run_dir, 4)
    os.killpg(p.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group gets SIGINT
    out, err = p.communicate(timeout=120)
    assert p.returncode == 3, out[-2000:] + err[-2000:]
    m = STOPPED.search(err)
    assert m and m.group(2) == "5000" and m.group(3) == str(run_dir), err
    k = int(m.group(1))
    assert k >= 4 and (run_dir / "checkpoints" / f"step_{k:08d}" / "meta.json").exists()
    assert steps(run_dir) == list(range(1, k + 1))
    assert not (run_dir / ".owner.json").exists()  # the job has ended: the folder is free
    resumed = run(run_dir, f"train.steps={k + 3}", resume=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert steps(run_dir) == list(range(1, k + 4))


def test_a_second_launch_on_a_busy_folder_is_refused_and_sigterm_of_the_command_stops_its_job(tmp_path):
    run_dir = tmp_path / "run"
    first = start(run_dir, "train.steps=5000")
    wait_for_steps(run_dir, 3)
    owner = json.loads((run_dir / ".owner.json").read_text())
    for resume in (True, False):
        second = run(run_dir, "train.steps=5000", resume=resume)
        assert second.returncode == 2, second.stderr
        line = second.stderr.strip()
        assert "\n" not in line and ("in use by job " + owner["job_id"] in line if resume else "--resume" in line)
    first.send_signal(signal.SIGTERM)  # the command only, not its job: `kill PID` of the follower
    out, err = first.communicate(timeout=120)
    assert first.returncode == 3 and STOPPED.search(err), err
    k = int(STOPPED.search(err).group(1))
    with pytest.raises(ProcessLookupError):  # the job's controller process is gone too
        os.kill(int(owner["job_id"]), 0)
    assert steps(run_dir) == list(range(1, k + 1))  # one writer: every step once


def test_a_stale_claim_is_taken_over_and_a_resume_without_a_checkpoint_starts_clean(tmp_path):
    run_dir = tmp_path / "run"
    p = start(run_dir, "train.steps=5000", "train.checkpoint_every=0")
    wait_for_steps(run_dir, 3)
    os.killpg(p.pid, signal.SIGKILL)  # the command, the job and its ranks die at once (a closed terminal, OOM)
    p.communicate(timeout=60)
    time.sleep(1)
    assert (run_dir / ".owner.json").exists() and not list((run_dir / "checkpoints").glob("step_*"))
    resumed = run(run_dir, "train.steps=4", resume=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "no longer runs; taking it over" in resumed.stderr
    assert "holds no checkpoint yet: the run starts again from step 1" in resumed.stderr
    assert steps(run_dir) == [1, 2, 3, 4]  # the rows of the killed start are not kept twice


def test_a_local_time_limit_stops_early_with_the_message_and_exit_3(tmp_path):
    run_dir = tmp_path / "run"
    done = run(run_dir, "train.steps=100000", "job.time_limit_min=1", "job.signal_delay_s=40")
    assert done.returncode == 3, done.stdout[-2000:] + done.stderr[-2000:]
    assert "the time limit was near" in done.stderr
    m = STOPPED.search(done.stderr)
    k = int(m.group(1))
    assert m.group(2) == "100000" and 0 < k < 100000 and steps(run_dir) == list(range(1, k + 1))
    assert "mean reward" not in done.stdout  # not the summary of a finished run


def test_a_corrupt_latest_checkpoint_is_named_and_the_previous_one_used(tmp_path):
    run_dir = tmp_path / "run"
    assert run(run_dir, "train.steps=4", "train.checkpoint_every=2").returncode == 0
    latest = run_dir / "checkpoints" / "step_00000004"
    (latest / "driver.pt").write_bytes(b"")  # cut off, as a disk that filled up during the save leaves it
    resumed = run(run_dir, "train.steps=6", "train.checkpoint_every=2", resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = rank_log(run_dir)
    assert f"warning: checkpoint {latest} is unreadable (EOFError" in log and "falling back" in log
    assert "resumed from " + str(run_dir / "checkpoints" / "step_00000002") in rank_log(run_dir, "out")
    assert steps(run_dir) == [1, 2, 3, 4, 5, 6]
    assert (run_dir / "checkpoints" / "corrupt-step_00000004").is_dir()


def test_a_killed_rank_is_named(tmp_path):
    run_dir = tmp_path / "run"
    p = start(run_dir, "train.steps=5000")
    wait_for_steps(run_dir, 3)
    pids = subprocess.run(["pgrep", "-f", f"submitit.core._submit {run_dir}/logs/"], capture_output=True,
                          text=True).stdout.split()
    ranks = {int(re.search(r"SUBMITIT_LOCAL_GLOBALID=(\d+)", Path(f"/proc/{pid}/environ").read_bytes()
                           .replace(b"\0", b" ").decode(errors="replace")).group(1)): int(pid) for pid in pids}
    os.kill(ranks[1], signal.SIGKILL)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 1, err
    lines = err[err.index("error: job"):].splitlines()
    assert re.fullmatch(r"  rank 1 on \S+: killed by a signal .*SIGKILL.*", lines[1]), err  # the cause first


@pytest.fixture
def small_disk(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    where = tmp_path / "small"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(where)], check=True)
    yield where
    subprocess.run(["umount", "-l", str(where)], check=True)


def test_a_full_disk_is_named(small_disk):
    done = run(small_disk / "run", "train.steps=3")
    assert done.returncode == 1, done.stderr[-2000:]
    assert "No space left on device" in done.stderr and "full" in done.stderr, done.stderr
