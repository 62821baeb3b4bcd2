"""A non-finite loss skips the optimizer step and is counted; train.max_bad_steps in a row abort the run.

Two real processes (trainer and rollout rank over gloo) run grpo.loop; the trainer's loss is made NaN on chosen
optimizer steps by wrapping grpo.train_step.policy_loss inside the trainer process."""

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from grpo.config import apply_overrides
from hpc.presets import get_preset


def worker(rank: int, init_file: str, run_dir: str, bad_calls: list[int], steps: int) -> None:
    import grpo.loop as loop
    import grpo.train_step

    torch.set_num_threads(1)
    if rank == 0:
        real, calls = grpo.train_step.policy_loss, [0]

        def poisoned(*args, **kwargs):
            calls[0] += 1
            loss, metrics = real(*args, **kwargs)
            return (loss * float("nan"), metrics) if calls[0] in bad_calls else (loss, metrics)

        grpo.train_step.policy_loss = poisoned
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        cfg = apply_overrides(get_preset("local"), [f"train.steps={steps}", "train.export_hf=false"])
        loop.run(cfg, loop.Roles(trainers=[0], rollouts=[1], device="cpu"), run_dir)
    except FloatingPointError as e:  # the trainer's verdict; the rollout rank then fails on the closed connection
        (Path(run_dir) / "error.txt").write_text(str(e))
        raise
    finally:
        dist.destroy_process_group()


def test_nonfinite_steps_are_skipped_and_counted(tmp_path):
    mp.spawn(worker, args=(str(tmp_path / "init"), str(tmp_path), [2, 3], 5), nprocs=2, join=True)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in rows] == [0, 1, 1, 0, 0]
    assert all(r["grad_norm"] != r["grad_norm"] for r in rows[1:3])  # NaN on the skipped steps
    assert all(r["grad_norm"] == r["grad_norm"] for r in rows[3:])  # the weights were not poisoned


def test_too_many_bad_steps_in_a_row_abort(tmp_path):
    with pytest.raises(Exception):
        mp.spawn(worker, args=(str(tmp_path / "init"), str(tmp_path), [2, 3, 4], 6), nprocs=2, join=True)
    assert "3 optimizer steps in a row had a non-finite" in (tmp_path / "error.txt").read_text()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in rows] == [0, 1, 1]  # the third bad step in a row (step 4) ended the run
