"""Tests for the login-node command `python -m hpc.submit`, run as a subprocess from an empty folder."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


def _submit(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return _run(tmp_path, "-m", "hpc.submit", *args, "--set", f"out_dir={tmp_path / 'runs'}")


@pytest.mark.parametrize("args, words", [
    (["--preset", "nope"], ["'nope'", "local"]),
    (["--preset", "local", "--set", "train.stepz=3"], ["'train.stepz'", "train.steps", "rollout.n", "train.lr"]),
    (["--preset", "local", "--set", "train.steps=abc"], ["train.steps", "int"]),
    (["--preset", "local", "--set", "train.steps=0"], ["train.steps=0"]),
    (["--preset", "local", "--set", "foo"], ["'foo'", "key=value"]),
    (["--preset", "local", "--set", "job.trainer_ranks=3"], ["3 trainer ranks", "job.trainer_ranks"]),
])
def test_bad_input_exits_2_with_one_line_and_creates_nothing(tmp_path, args, words):
    p = _submit(tmp_path, *args)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), p.stderr
    assert all(w in lines[0] for w in words), lines[0]
    assert p.stdout == ""  # the plan is printed only for a valid config
    assert list(tmp_path.iterdir()) == []  # neither out_dir nor a default ./runs


def test_dry_run_prints_plan_and_creates_nothing(tmp_path):
    p = _submit(tmp_path, "--preset", "local", "--dry-run", "--set", "train.steps=7")
    assert p.returncode == 0, p.stderr
    assert "plan for preset 'local'" in p.stdout
    assert "ranks 0:" in p.stdout and "ranks 1:" in p.stdout and "7 steps" in p.stdout
    assert "nothing submitted" in p.stdout
    assert list(tmp_path.iterdir()) == []


def test_missing_preset_is_a_usage_error(tmp_path):
    p = _run(tmp_path, "-m", "hpc.submit", "--dry-run")
    assert p.returncode == 2 and "--preset" in p.stderr
    assert list(tmp_path.iterdir()) == []


def test_import_does_not_load_torch(tmp_path):
    p = _run(tmp_path, "-c", "import sys, hpc.submit; assert 'torch' not in sys.modules, 'torch imported'")
    assert p.returncode == 0, p.stderr
