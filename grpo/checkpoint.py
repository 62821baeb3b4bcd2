"""Sharded checkpoints with torch.distributed.checkpoint: each trainer rank writes its own shards.

A checkpoint is written to `checkpoints/.tmp-step_N` and renamed to `checkpoints/step_N` once every rank has
finished, so a crash during a save leaves the previous checkpoint as the latest complete one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict


def step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:08d}"


def save(run_dir: Path, step: int, model, optimizer, group, is_leader: bool) -> Path:
    """Collective over the trainer group `group`."""
    final = step_dir(run_dir, step)
    tmp = final.with_name(".tmp-" + final.name)
    if is_leader and tmp.exists():
        shutil.rmtree(tmp)
    dist.barrier(group=group)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp), process_group=group)
    dist.barrier(group=group)
    if is_leader:
        (tmp / "meta.json").write_text(json.dumps({"step": step}))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    dist.barrier(group=group)
    return final


def latest(run_dir: Path) -> Path | None:
    found = sorted((Path(run_dir) / "checkpoints").glob("step_*"))
    return found[-1] if found else None
