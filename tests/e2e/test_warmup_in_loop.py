"""The learning-rate warmup in the real loop: stepped once per training step (verl), not per optimizer step."""

import json

import pytest

from tests.e2e.test_local_preset import submit


def test_warmup_steps_once_per_training_step_with_two_mini_batches(tmp_path):
    _, run_dir = submit(tmp_path, "train.steps=4", "train.mini_batches=2", "train.warmup_steps=3", "train.lr=0.003")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # the lr each step trained with: s / w for s = 0, 1, 2, then the full lr (two optimizer steps share each value)
    assert [r["lr"] for r in rows] == pytest.approx([0.0, 0.001, 0.002, 0.003])
