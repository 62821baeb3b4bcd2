"""Sharded checkpoints with torch.distributed.checkpoint: each trainer rank writes its own shards.

A checkpoint is written to `checkpoints/.tmp-step_N` and renamed to `checkpoints/step_N` once every rank has
finished, so a crash during a save leaves the previous checkpoint as the latest complete one. It holds the model,
the optimizer, and in `driver.pt` the step, the scheduler, the data position and the RNG states. The last `keep`
checkpoints are kept.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

DRIVER = "driver.pt"
# torch is imported inside the functions that need it: the login node lists checkpoints (hpc.submit) without it


def step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:08d}"


def save(run_dir: Path, step: int, model, optimizer, extra: dict, *, group, is_leader: bool, keep: int = 2) -> Path:
    """Collective over the trainer group `group`. `extra` (picklable) is written by the leader."""
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

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
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    # the small driver state first: a truncated driver.pt fails here, before any shard is touched
    driver = torch.load(Path(path) / DRIVER, weights_only=False)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path), process_group=group)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return driver


def load_latest(run_dir: Path, model, optimizer, *, group, is_leader: bool) -> dict | None:
    """Load the newest complete checkpoint that reads; an unreadable one (a truncated or corrupt file) is named in a
    warning, moved aside to `corrupt-step_N` (by the leader) and the previous one is tried. None when there is no
    checkpoint; RuntimeError naming every checkpoint when none reads. Every rank reads the same files, so every
    rank takes the same branch."""
    import torch.distributed as dist

    found = complete(run_dir)
    failures = []
    for path in reversed(found):
        try:
            return load(path, model, optimizer, group=group)
        except Exception as e:  # noqa: BLE001 - any reader error: EOFError, pickle, CheckpointException, OSError
            why = f"{e.__class__.__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else 'no message'}"
            failures.append(f"{path.name} ({why})")
            if is_leader:
                print(f"warning: checkpoint {path} is unreadable ({why}); "
                      f"{'falling back to the previous one' if path != found[0] else 'no older checkpoint'}",
                      file=sys.stderr, flush=True)
            dist.barrier(group=group)
            if is_leader:
                path.rename(path.with_name("corrupt-" + path.name))
    if failures:
        raise RuntimeError(f"no checkpoint of {run_dir} can be read: {'; '.join(failures)}")
    return None
