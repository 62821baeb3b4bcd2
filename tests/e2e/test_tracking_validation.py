"""The `local` loop on a dataset scored by a user's reward function, with validation and tracking: the TensorBoard
event file read back with tensorboard's own reader equals metrics.jsonl under verl's names; a validation prompt
whose scorer hangs costs a zero and a counted timeout, not the job; samples.jsonl and config.yaml are written."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from grpo.tracking import val_names, verl_names

PLUGIN = '''
import time

def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    if ground_truth == "hang":  # one validation row: the scorer never returns
        time.sleep(3600)
    want, got = ground_truth.split(), solution_str.split()
    hits = sum(a == b for a, b in zip(want, got))
    return {"score": hits / max(len(want), len(got), 1), "words": float(len(got))}
'''


def row(digit, source, truth=None):
    return {"data_source": source, "prompt": [{"role": "user", "content": f"repeat {digit} :"}],
            "reward_model": {"style": "rule", "ground_truth": truth or " ".join([str(digit)] * 4)},
            "extra_info": {"index": digit}}


def test_dataset_run_with_plugin_validation_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    plugin = tmp_path / "reward.py"
    plugin.write_text(PLUGIN)
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(row(d, "toy/repeat")) + "\n" for d in range(10)))
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps(r) + "\n" for r in
                           [row(1, "toy/a"), row(2, "toy/a"), row(3, "toy/b"), row(4, "toy/b", truth="hang")]))
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "preset": "local", "out_dir": str(tmp_path / "runs"),
        "data": {"task": "dataset", "train_path": str(train), "val_path": str(val), "prompts_per_step": 4},
        "reward": {"function": f"{plugin}:compute_score", "timeout_s": 2.0, "workers": 2},
        "train": {"steps": 4, "val_every": 2},
        "track": {"samples_per_step": 3}}))
    proc = subprocess.run([sys.executable, "-m", "hpc.submit", "--config", str(config), "--set", "rollout.top_k=8"],
                          capture_output=True, text=True, timeout=900, cwd=Path(__file__).parents[2])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "reward: compute_score() from" in proc.stdout  # the login-node check called it once
    run_dir = Path(re.search(r"^run folder: (.+)$", proc.stdout, re.M).group(1))

    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved == json.loads((run_dir / "config.json").read_text())
    assert resolved["rollout"]["top_k"] == 8 and resolved["reward"]["timeout_s"] == 2.0

    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert r["reward_timeouts"] == 0 and r["reward_errors"] == 0
        assert r["reward_extra/words"] > 0 and 0 <= r["frac_reward_zero_std"] <= 1
        assert r["adv_min"] <= r["adv_mean"] <= r["adv_max"] and r["num_tokens"] > 0

    vals = [json.loads(x) for x in (run_dir / "validation.jsonl").read_text().splitlines()]
    assert [v["step"] for v in vals] == [0, 2, 4]  # before training, every 2 steps, and the last
    for v in vals:
        assert v["val/n"] == 1 and v["val/prompts"] == 4
        assert v["val/reward_timeouts"] == 1  # the hung scorer, once per validation
        assert set(k for k in v if k.endswith("/reward")) == {"val/reward", "val/toy/a/reward", "val/toy/b/reward"}
        assert 0 <= v["val/toy/b/reward"] <= 0.5  # one of its two rows is the hung one: 0
        assert v["val/toy/a/words"] > 0  # the reward function's own number, per data source

    samples = [json.loads(x) for x in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]
    assert all(s["prompt"].startswith("repeat") and isinstance(s["reward"], float) for s in samples)

    # TensorBoard, read back with tensorboard's own reader: every tag and value of every step
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("actor/pg_loss", "actor/entropy", "actor/kl_loss", "actor/grad_norm", "actor/pg_clipfrac",
                "critic/score/mean", "critic/rewards/mean", "critic/advantages/mean", "critic/advantages/max",
                "critic/advantages/min", "response_length/mean", "response_length/max", "response_length/min",
                "response_length/clip_ratio", "timing_s/gen", "timing_s/update_actor", "timing_s/step",
                "perf/throughput", "frac_reward_zero_std", "reward/timeouts", "val-core/toy/a/reward/mean@1",
                "val-aux/toy/a/words/mean@1"):
        assert tag in tags, tag
    expected: dict[str, dict[int, float]] = {}
    for r in rows:
        for name, value in verl_names(r, num_gpus=2).items():
            expected.setdefault(name, {})[r["step"]] = value
    for v in vals:
        for name, value in val_names(v).items():
            expected.setdefault(name, {})[v["step"]] = value
    assert tags == set(expected)
    for name, by_step in expected.items():
        got = {e.step: e.value for e in acc.Scalars(name)}
        assert got == pytest.approx(by_step, rel=1e-6, abs=1e-6), name
    assert acc.Scalars("critic/score/mean")[0].value == pytest.approx(rows[0]["reward"], rel=1e-6)


def test_toy_validation_with_two_trainer_ranks_off_policy(tmp_path):
    """Validation rounds in the control protocol with two trainer ranks and a batch generated ahead (off-policy):
    the protocol stays in step, validation of the toy task at 0, 2 and 4, in rounds of one training batch."""
    args = [sys.executable, "-m", "hpc.submit", "--preset", "local"]
    for o in (f"out_dir={tmp_path}", "train.steps=4", "train.val_every=2", "job.trainer_ranks=2",
              "train.off_policy_steps=1", "data.val_max_prompts=20", "data.val_n=8", "data.prompts_per_step=4",
              "rollout.n=16"):
        args += ["--set", o]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=900, cwd=Path(__file__).parents[2])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = Path(re.search(r"^run folder: (.+)$", proc.stdout, re.M).group(1))
    vals = [json.loads(x) for x in (run_dir / "validation.jsonl").read_text().splitlines()]
    # 20 prompts x 8 samples in rounds of a training batch's 64 responses: 8, 8 and 4 prompts
    assert [v["step"] for v in vals] == [0, 2, 4] and all(v["val/prompts"] == 20 and v["val/n"] == 8 for v in vals)
    assert all(v["val/repeat/reward"] <= v["val/repeat/reward_best"] <= 1 for v in vals)
    assert all(0 <= v["val/repeat/reward"] <= 1 and v["val/response_len"] > 0 for v in vals)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
