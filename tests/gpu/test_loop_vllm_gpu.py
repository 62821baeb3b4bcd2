"""The whole GRPO loop with a real vLLM engine (0.24 on the GPU test machine), through `python -m hpc.submit`: the
`h100x2` preset with rollout.engine=vllm, trainer on GPU 0, vLLM (its own worker process) on GPU 1, weights synced
every step over NCCL through the worker extension. A tiny checkpoint folder is written first (grpo.bench.assets)."""

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from grpo.bench.assets import SHAPES, write_model_folder, write_prompts

ROOT = Path(__file__).parents[2]
pytestmark = [pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vllm"),
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")]


def test_loop_with_vllm_engine(tmp_path):
    model, prompts = tmp_path / "model", tmp_path / "prompts.jsonl"
    write_model_folder(model, "small", device=torch.device("cuda"))
    write_prompts(prompts, num=32, length=12, vocab_size=SHAPES["small"]["vocab_size"])
    sets = {"model.path": model, "model.arch": "", "data.train_path": prompts, "data.prompts_per_step": 4,
            "data.max_prompt_len": 16, "rollout.engine": "vllm", "rollout.n": 4, "rollout.max_new_tokens": 16,
            "rollout.gpu_memory_utilization": 0.3, "rollout.max_num_seqs": 32, "rollout.sync_bucket_mb": 1,
            "train.steps": 6, "train.lr": 1e-2, "train.export_hf": "false", "job.executor": "local",
            "out_dir": tmp_path / "runs"}
    args = [sys.executable, "-m", "hpc.submit", "--preset", "h100x2"]
    for key, value in sets.items():
        args += ["--set", f"{key}={value}"]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "vllm" in proc.stdout
    run_dir = Path(re.search(r"^run folder: (.+)$", proc.stdout, re.M).group(1))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))
    # lr 1e-2 moves the weights every step: vLLM's log-probs stay those of the trainer's current weights (bf16
    # noise only) only if every sync arrived
    mismatch = [r["mismatch_abs"] for r in rows]
    print("mismatch per step", mismatch, "grad norms", [round(r["grad_norm"], 3) for r in rows],
          "sync ms", [round(r["sync_s"] * 1e3, 1) for r in rows])
    assert max(mismatch) < 0.05, mismatch
    assert all(0 < r["response_len"] <= 16 for r in rows)
