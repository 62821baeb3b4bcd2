"""Checkpoint and resume: a run stopped after step 4 and resumed gives the same metrics as one never stopped."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def submit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hpc.submit", "--preset", "local", *args],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_resume_matches_an_uninterrupted_run(tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert submit("--set", "train.steps=6", "--run-dir", str(whole)).returncode == 0
    assert submit("--set", "train.steps=4", "--run-dir", str(parts)).returncode == 0
    # the folder exists: without --resume it is refused, with another config too
    again = submit("--set", "train.steps=6", "--run-dir", str(parts))
    assert again.returncode == 2 and "--resume" in again.stderr
    other = submit("--set", "train.steps=6", "--set", "train.lr=0.1", "--run-dir", str(parts), "--resume")
    assert other.returncode == 2 and "train.lr" in other.stderr
    resumed = submit("--set", "train.steps=6", "--run-dir", str(parts), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = metrics(whole), metrics(parts)
    assert [r["step"] for r in b] == list(range(1, 7))  # no step lost or repeated
    measured = lambda row: {k: v for k, v in row.items() if not k.endswith(("_s", "_gib"))}  # times, memory
    for ra, rb in zip(a, b):
        assert measured(ra) == measured(rb)
    kept = sorted(p.name for p in (parts / "checkpoints").iterdir())
    assert kept == ["step_00000004", "step_00000006"]
