"""The run folder: metrics.jsonl (one JSON object per step), the reward plot, and reading them back.

No torch here: `hpc.submit` reads the metrics to draw its progress bar.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

METRICS = "metrics.jsonl"
CONFIG = "config.json"
PLOT = "reward.png"


def append_metrics(run_dir: str | os.PathLike, row: dict) -> None:
    """One line per step, flushed and fsynced so a follower or a crash never sees half a line."""
    with open(Path(run_dir) / METRICS, "a") as f:
        f.write(json.dumps(row, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    text = path.read_text()
    complete = text[:text.rfind("\n") + 1]  # a line still being written is read next time
    return [json.loads(line) for line in complete.splitlines() if line.strip()]


def truncate_metrics(run_dir: str | os.PathLike, last_step: int) -> None:
    """Drop rows after `last_step` (a resumed run redoes those steps), atomically."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        return
    rows = [r for r in read_metrics(run_dir) if r["step"] <= last_step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    os.replace(tmp, path)


def reward_summary(rows: list[dict], window: int = 10) -> tuple[float, float]:
    """Mean reward of the first and of the last `window` steps."""
    rewards = [r["reward"] for r in rows]
    if not rewards:
        raise ValueError("no steps recorded")
    first, last = rewards[:window], rewards[-window:]
    return sum(first) / len(first), sum(last) / len(last)


def plot_rewards(run_dir: str | os.PathLike) -> Path:
    """reward.png: mean reward and mean response length per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["reward"] for r in rows], color="tab:blue", label="mean reward")
    ax.set_xlabel("step")
    ax.set_ylabel("mean reward", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(steps, [r["response_len"] for r in rows], color="tab:orange", label="mean response length")
    ax2.set_ylabel("mean response length (tokens)", color="tab:orange")
    ax.set_title(Path(run_dir).name)
    fig.tight_layout()
    out = Path(run_dir) / PLOT
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
