"""Sharded checkpoints with torch.distributed.checkpoint: each trainer rank writes its own shards.

A checkpoint is written to `checkpoints/.tmp-step_N` and renamed to `checkpoints/step_N` once every rank has
finished, so a crash during a save leaves the previous checkpoint as the latest complete one. It holds the model,
the optimizer, and in `driver.pt` the step, the scheduler, the data position and the RNG states. The last `keep`
checkpoints are kept.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

DRIVER = "driver.pt"


def step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:08d}"


def save(run_dir: Path, step: int, model, optimizer, extra: dict, *, group, is_leader: bool, keep: int = 2) -> Path:
    """Collective over the trainer group `group`. `extra` (picklable) is written by the leader."""
    final = step_dir(run_dir, step)
    tmp = final.with_name(".tmp-" + final.name)
    if is_leader and tmp.exists():
        shutil.rmtree(tmp)
    dist.barrier(group=group)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp), process_group=group)
    if is_leader:
        torch.save({"step": step, **extra}, tmp / DRIVER)
    dist.barrier(group=group)
    if is_leader:
        (tmp / "meta.json").write_text(json.dumps({"step": step}))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in complete(run_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old)
    dist.barrier(group=group)
    return final


def complete(run_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first (a `.tmp-` folder is an interrupted save and does not count)."""
    return sorted(p for p in (Path(run_dir) / "checkpoints").glob("step_*") if (p / "meta.json").exists())


def latest(run_dir: Path) -> Path | None:
    found = complete(run_dir)
    return found[-1] if found else None


def load(path: Path, model, optimizer, *, group) -> dict:
    """Load model and optimizer shards in place (collective over `group`); returns the driver state."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path), process_group=group)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return torch.load(Path(path) / DRIVER, weights_only=False)
