"""`hpc.submit` on a machine with no Slurm commands at all (a laptop): dry runs print the plan and the script, a real
submission is refused before anything is created. Run with a PATH that holds no Slurm binary."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ("NODELIST|PARTITION|STATE|STATECOMPLETE|GRES|GRES_USED|CPUS|MEMORY|AVAIL|TIMELIMIT|REASON\n"
           + "".join(f"g{i}|h800|idle|idle|gpu:h800:8|gpu:h800:0(IDX:N/A)|128|2048000|up|2-00:00:00|none\n"
                     for i in range(4)))


def submit(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    empty = tmp_path / "bin"
    empty.mkdir(exist_ok=True)
    env = dict(os.environ, PATH=str(empty), PYTHONPATH=str(ROOT))
    env.pop("SLURM_CONF", None)
    return subprocess.run([sys.executable, "-m", "hpc.submit", *args, "--set", f"out_dir={tmp_path / 'runs'}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("preset", ["h800x32", "h20x32", "h100x8-lora"])
def test_dry_run_of_the_70b_presets_prints_plan_and_script(tmp_path, preset):
    p = submit(tmp_path, "--preset", preset, "--dry-run")
    assert p.returncode == 0, p.stderr
    assert f"plan for preset '{preset}'" in p.stdout and "sbatch script:" in p.stdout
    assert "#!/bin/bash" in p.stdout and "srun --unbuffered" in p.stdout and "#SBATCH --gres=gpu:" in p.stdout
    assert "Traceback" not in p.stderr and "dry run: nothing submitted" in p.stdout
    assert not (tmp_path / "runs").exists()


def test_dry_run_against_a_cluster_file(tmp_path):
    (tmp_path / "cluster.txt").write_text(CLUSTER)
    p = submit(tmp_path, "--preset", "h800x32", "--dry-run", "--cluster-file", str(tmp_path / "cluster.txt"))
    assert p.returncode == 0, p.stderr
    assert "#SBATCH --partition=h800" in p.stdout and "Traceback" not in p.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("cluster_file", [False, True])
def test_a_real_submission_is_refused_before_anything_is_created(tmp_path, cluster_file):
    (tmp_path / "cluster.txt").write_text(CLUSTER)
    args = ["--cluster-file", str(tmp_path / "cluster.txt")] if cluster_file else []
    p = submit(tmp_path, "--preset", "h800x32", *args, "--run-dir", str(tmp_path / "runs" / "r"))
    assert p.returncode == 2, (p.stdout, p.stderr)
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "--dry-run" in lines[0], p.stderr
    assert not (tmp_path / "runs").exists()
