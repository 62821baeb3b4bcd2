"""The whole GRPO loop on GPUs through `python -m hpc.submit` (submitit's local executor, NCCL): the trainer on one
GPU and the engine on another, and both sharing one GPU. The tiny model learns the toy task as on the CPU."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[2]


@pytest.mark.parametrize("gpus, mode", [(2, "split"), (2, "off-policy"), (1, "colocated")])
def test_local_preset_on_gpus(tmp_path, gpus, mode):
    if torch.cuda.device_count() < gpus:
        pytest.skip(f"needs {gpus} GPUs")
    extra = {"split": [], "off-policy": ["--set", "train.off_policy_steps=1"],
             "colocated": ["--set", "job.layout=colocated"]}[mode]
    args = [sys.executable, "-m", "hpc.submit", "--preset", "local", "--set", f"out_dir={tmp_path}",
            "--set", "job.gpu_type=h100", "--set", f"job.gpus_per_node={gpus}", "--set", "job.trainer_ranks=1",
            "--set", "train.steps=150", *extra]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "nccl" in proc.stdout
    run_dir = Path(re.search(r"^run folder: (.+)$", proc.stdout, re.M).group(1))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    first = sum(r["reward"] for r in rows[:10]) / 10
    last = sum(r["reward"] for r in rows[-10:]) / 10
    assert last > first + 0.2, (first, last)
    if mode != "off-policy":  # off-policy the engine runs weights one update older, by design
        assert max(r["mismatch_abs"] for r in rows) < 1e-3  # the engine runs the weights the trainer sent
    print(f"{gpus} GPU(s), {mode}: reward {first:.3f} -> {last:.3f}, median step "
          f"{sorted(r['step_s'] for r in rows)[len(rows) // 2] * 1e3:.1f} ms, sync "
          f"{sorted(r['sync_s'] for r in rows)[len(rows) // 2] * 1e3:.2f} ms")
