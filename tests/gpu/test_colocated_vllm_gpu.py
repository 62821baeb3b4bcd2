"""Colocated on one GPU with a real vLLM engine (0.24 on the GPU test machine): Qwen2.5-1.5B shapes, full fine-tuning
with activation checkpointing off, and rollout.free_cache_engine=true, so the engine takes most of the GPU while it
generates and sleeps (vLLM sleep mode level 2: weights and KV cache freed) while the trainer updates. The trainer's
peak and the engine's share do not fit the card together; the run completes, and the whole GPU's use, measured at
the end of each phase, stays under the card: they took turns."""

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
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("share", [None, 0.6], ids=["planner-share", "share-0.6"])
def test_colocated_vllm_time_shares_one_gpu(tmp_path, share):
    model, prompts = tmp_path / "model", tmp_path / "prompts.jsonl"
    write_model_folder(model, "qwen2.5-1.5b", device=torch.device("cuda"))
    write_prompts(prompts, num=64, length=128, vocab_size=SHAPES["qwen2.5-1.5b"]["vocab_size"])
    torch.cuda.empty_cache()
    sets = {"model.path": model, "model.arch": "", "data.train_path": prompts, "data.prompts_per_step": 8,
            "data.max_prompt_len": 128, "rollout.engine": "vllm", "rollout.n": 8, "rollout.max_new_tokens": 512,
            "rollout.ignore_eos": "true", "rollout.free_cache_engine": "true", "job.layout": "colocated",
            "job.gpu_type": "h200", "model.activation_checkpointing": "false", "train.steps": 3,
            "train.export_hf": "false", "job.executor": "local", "out_dir": tmp_path / "runs"}
    if share is not None:  # None: the planner sizes the engine's share (0.72 of an H200 for these shapes)
        sets["rollout.gpu_memory_utilization"] = share
    args = [sys.executable, "-m", "hpc.submit", "--preset", "h100x1"]
    for key, value in sets.items():
        args += ["--set", f"{key}={value}"]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=520)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "the engine sleeps during the update" in proc.stdout
    run_dir = Path(re.search(r"^run folder: (.+)$", proc.stdout, re.M).group(1))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    plan = json.loads((run_dir / "plan.json").read_text())
    card = torch.cuda.get_device_properties(0).total_memory / 2**30
    engine_share = plan["settings"]["rollout.gpu_memory_utilization"] * card
    trainer_peak = max(r["trainer_gpu_peak_gib"] for r in rows)
    gen_used = max(r["gen_device_used_gib"] for r in rows)
    update_used = max(r["update_device_used_gib"] for r in rows)
    summary = dict(share=plan["settings"]["rollout.gpu_memory_utilization"], card_gib=card,
                   engine_share_gib=engine_share, trainer_peak_reserved_gib=trainer_peak,
                   gen_device_used_gib=gen_used, update_device_used_gib=update_used,
                   step_s=[r["step_s"] for r in rows], generate_s=[r["generate_s"] for r in rows],
                   update_s=[r["update_s"] for r in rows], sync_s=[r["sync_s"] for r in rows],
                   mismatch=[r["mismatch_abs"] for r in rows])
    print("COLOCATED_VLLM " + json.dumps(summary))
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert trainer_peak + engine_share > card, summary  # they do not fit together...
    assert gen_used < card and update_used < card, summary  # ...and took turns
    assert gen_used > engine_share * 0.9, summary  # the engine really held its share while generating
    assert max(r["mismatch_abs"] for r in rows) < 0.05, summary  # every sync reached the woken engine
