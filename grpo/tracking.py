"""Experiment tracking: each metrics.jsonl row also goes to TensorBoard (always, event files in the run folder's
`tensorboard/`) and to Weights & Biases (track.wandb=true, when wandb is installed), under verl's metric names; a
few sampled completions per step go to samples.jsonl.

metrics.jsonl keeps its own short keys (the CLI's progress bar and the tests read `reward`, `response_len`,
`step_s`, ...); `verl_names` is the one place that maps them to the names verl logs (`actor/pg_loss`,
`critic/score/mean`, `response_length/mean`, `timing_s/gen`, ...) and adds the derived ones (`perf/throughput`).
TRL's names where verl has none (`frac_reward_zero_std`). Keys not in the table keep their name under `other/`, so
nothing a row holds is dropped; wall-clock timestamps are not plotted.

No torch at module scope: tests and tools read the mapping without it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

SAMPLES = "samples.jsonl"
VALIDATION = "validation.jsonl"
TB_DIR = "tensorboard"

# metrics.jsonl key -> verl's name(s)
VERL_NAMES: dict[str, tuple[str, ...]] = {
    "pg_loss": ("actor/pg_loss",),
    "entropy": ("actor/entropy",),
    "kl": ("actor/kl_loss",),
    "grad_norm": ("actor/grad_norm",),
    "clipfrac": ("actor/pg_clipfrac",),
    "clipfrac_lower": ("actor/pg_clipfrac_lower",),
    "approx_kl": ("actor/ppo_kl",),
    "lr": ("actor/lr",),
    "skipped_steps": ("actor/skipped_steps",),
    # the reward is the score: no KL in the reward (verl's use_kl_in_reward=False), so critic/rewards equals it
    "reward": ("critic/score/mean", "critic/rewards/mean"),
    "reward_max": ("critic/score/max", "critic/rewards/max"),
    "reward_min": ("critic/score/min", "critic/rewards/min"),
    "reward_std": ("critic/score/std",),
    "frac_reward_zero_std": ("frac_reward_zero_std",),  # TRL's name: groups whose rewards are all equal
    "adv_mean": ("critic/advantages/mean",),
    "adv_max": ("critic/advantages/max",),
    "adv_min": ("critic/advantages/min",),
    "response_len": ("response_length/mean",),
    "response_len_max": ("response_length/max",),
    "response_len_min": ("response_length/min",),
    "response_clip_frac": ("response_length/clip_ratio",),
    "stop_frac": ("response_length/stop_ratio",),
    "prompt_len": ("prompt_length/mean",),
    "num_tokens": ("perf/total_num_tokens",),
    "generate_s": ("timing_s/gen",),
    "rollout_s": ("timing_s/rollout",),
    "rollout_wait_s": ("timing_s/rollout_wait",),
    "reward_score_s": ("timing_s/reward",),
    "update_s": ("timing_s/update_actor",),
    "sync_s": ("timing_s/update_weights",),
    "next_batch_wait_s": ("timing_s/next_batch_wait",),
    "step_s": ("timing_s/step", "perf/time_per_step"),
    "reward_timeouts": ("reward/timeouts",),
    "reward_errors": ("reward/errors",),
    "mismatch_abs": ("rollout_corr/logp_abs_diff_mean",),
    "weights_age": ("rollout_corr/weights_age",),
    "engine_peak_gib": ("perf/max_memory_reserved_gb_rollout",),
    "trainer_gpu_peak_gib": ("perf/max_memory_reserved_gb",),
    "trainer_gpu_peak_alloc_gib": ("perf/max_memory_allocated_gb",),
    "gen_device_used_gib": ("perf/device_memory_used_gb_gen",),  # the whole GPU, whoever holds it
    "update_device_used_gib": ("perf/device_memory_used_gb_update",),
}
NOT_PLOTTED = frozenset({"step", "gen_t0", "gen_t1", "update_t0", "update_t1"})  # wall-clock timestamps


def verl_names(row: dict, *, num_gpus: int = 1) -> dict[str, float]:
    """A metrics.jsonl row as {verl name: value}. `num_gpus`: the job's GPUs (or CPU ranks) for perf/throughput,
    verl's tokens per second per GPU."""
    out: dict[str, float] = {}
    for key, value in row.items():
        if key in NOT_PLOTTED or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        if key in VERL_NAMES:
            names = VERL_NAMES[key]
        elif key.startswith(("rollout_is", "reward_extra/")):
            names = (f"rollout_corr/{key}" if key.startswith("rollout_is") else key,)
        else:
            names = (f"other/{key}",)
        for name in names:
            out[name] = float(value)
    if row.get("num_tokens") and row.get("step_s"):
        out["perf/throughput"] = row["num_tokens"] / row["step_s"] / max(1, num_gpus)
        out["perf/tokens_per_s"] = row["num_tokens"] / row["step_s"]  # the whole job's, as TRL users compare
    return out


def val_names(row: dict) -> dict[str, float]:
    """A validation row (`val/<data_source>/reward`, ...) under verl's names: the headline mean@n of each data
    source in `val-core/`, the rest in `val-aux/` (a reward function's own numbers as `val-aux/<source>/<key>/
    mean@n`)."""
    n = int(row.get("val/n", 1))
    out = {}
    for key, value in row.items():
        if key == "step" or not key.startswith("val/") or key in ("val/n",):
            continue
        if key.endswith("/reward") and key != "val/reward":
            out[f"val-core/{key[4:]}/mean@{n}"] = float(value)
        elif key.endswith("/reward_best"):
            out[f"val-aux/{key[4:-len('_best')]}/best@{n}/mean"] = float(value)
        elif key.count("/") >= 2 and key not in ("val/reward_timeouts",):  # val/<source>/<key>: an extra number
            out[f"val-aux/{key[4:]}/mean@{n}"] = float(value)
        else:
            out[f"val-aux/{key[4:]}"] = float(value)
    return out


class Tracker:
    """The driver's sinks for one run: TensorBoard (always), W&B (when asked), samples.jsonl, validation.jsonl.
    `start`: the first step this process runs (a resumed run purges TensorBoard events after its checkpoint)."""

    def __init__(self, run_dir: str | os.PathLike, cfg, *, num_gpus: int = 1, start: int = 1):
        self.run_dir, self.num_gpus = Path(run_dir), num_gpus
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # a dependency (setup.py); an environment built without it still trains
            print("warning: tensorboard is not installed (pip install 'tensorboard>=2.14,<3'): no event files, "
                  "metrics.jsonl only", file=sys.stderr, flush=True)
            self.tb = None
        else:  # a resumed run drops the events after its checkpoint, which it redoes
            self.tb = SummaryWriter(str(self.run_dir / TB_DIR), purge_step=start if start > 1 else None)
        self.wandb = None
        if cfg.track.wandb:
            import wandb  # checked on the login node (hpc.checks)

            from grpo.config import to_dict

            # one W&B run per run folder: a resumed job continues it
            self.wandb = wandb.init(project=cfg.track.wandb_project, name=self.run_dir.name, id=self.run_dir.name,
                                    resume="allow", dir=str(self.run_dir), config=to_dict(cfg))

    def log(self, row: dict) -> None:
        self._write(row["step"], verl_names(row, num_gpus=self.num_gpus))

    def log_validation(self, row: dict) -> None:
        append_jsonl(self.run_dir / VALIDATION, row)
        self._write(row["step"], val_names(row))

    def log_samples(self, step: int, samples: list[dict]) -> None:
        if not samples:
            return
        for s in samples:
            append_jsonl(self.run_dir / SAMPLES, {"step": step, **s})
        table = "| reward | prompt | response |\n|---|---|---|\n" + "\n".join(
            f"| {s['reward']:.3f} | {_cell(s['prompt'])} | {_cell(s['response'])} |" for s in samples)
        if self.tb is not None:
            self.tb.add_text("samples", table, step)

    def _write(self, step: int, values: dict[str, float]) -> None:
        if self.tb is not None:
            for name, value in values.items():
                self.tb.add_scalar(name, value, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")[:500]


def append_jsonl(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row, sort_keys=True) + "\n")
        f.flush()


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Drop the rows after `last_step` (a resumed run redoes those steps)."""
    if not path.exists():
        return
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows if r["step"] <= last_step))
    os.replace(tmp, path)
