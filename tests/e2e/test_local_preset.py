"""End to end: `python -m hpc.submit --preset local` as a user runs it, in a subprocess, through submitit."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from grpo.config import apply_overrides, to_dict
from hpc.presets import get_preset


def submit(tmp_path: Path, *overrides: str, timeout: int = 600) -> tuple[subprocess.CompletedProcess, Path]:
    args = [sys.executable, "-m", "hpc.submit", "--preset", "local", "--set", f"out_dir={tmp_path}"]
    for o in overrides:
        args += ["--set", o]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=Path(__file__).parents[2])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    match = re.search(r"^run folder: (.+)$", proc.stdout, re.M)
    assert match, proc.stdout
    return proc, Path(match.group(1))


def first_last(run_dir: Path) -> tuple[list[dict], float, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rewards = [r["reward"] for r in rows]
    return rows, sum(rewards[:10]) / 10, sum(rewards[-10:]) / 10


def test_short_run_folder_is_complete(tmp_path):
    steps = 60
    proc, run_dir = submit(tmp_path, f"train.steps={steps}")
    assert "plan for preset 'local'" in proc.stdout
    rows, first, last = first_last(run_dir)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    for key in ("reward", "response_len", "step_s", "rollout_s", "update_s", "sync_s", "kl", "grad_norm"):
        assert all(isinstance(r[key], float) for r in rows), key
    config = json.loads((run_dir / "config.json").read_text())
    assert config == to_dict(apply_overrides(get_preset("local"), [f"out_dir={tmp_path}", f"train.steps={steps}"]))
    ckpt = run_dir / "checkpoints" / f"step_{steps:08d}"
    assert json.loads((ckpt / "meta.json").read_text()) == {"step": steps}
    assert any(ckpt.glob("*.distcp")) and (ckpt / ".metadata").exists()
    assert (run_dir / "reward.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the rollout engine runs the weights the trainer just produced: its log-probs match the trainer's
    assert max(r["mismatch_abs"] for r in rows) < 1e-4
    assert last > first + 0.05, (first, last)
    assert f"first 10 steps {first:.3f}, last 10 steps {last:.3f}" in proc.stdout


def test_two_trainer_ranks(tmp_path):
    """Data parallelism: two FSDP2 trainer ranks share the rows, one rollout rank."""
    proc, run_dir = submit(tmp_path, "train.steps=4", "job.trainer_ranks=2")
    rows, _, _ = first_last(run_dir)
    assert len(rows) == 4
    assert "ranks 0-1: FSDP2 policy" in proc.stdout
    assert len(list((run_dir / "checkpoints" / "step_00000004").glob("*.distcp"))) == 2  # one shard file per rank


@pytest.mark.slow
@pytest.mark.parametrize("layout", [[], ["train.off_policy_steps=1"], ["job.layout=colocated"]],
                         ids=["split", "split-off-policy", "colocated"])
def test_local_preset_learns(tmp_path, layout):
    """The acceptance claim: the full preset raises the mean reward of the last 10 steps by 0.3 over the first 10,
    in each layout."""
    proc, run_dir = submit(tmp_path, *layout)
    _, first, last = first_last(run_dir)
    assert last >= first + 0.3, (first, last)


def test_data_parallel_and_micro_batches_give_the_same_update(tmp_path):
    """Two trainer ranks with token-budget micro-batches must compute what one rank does with the whole batch:
    the loss normalisation (global token count x dp, FSDP2's gradient averaging) and the accumulation are right."""
    keys = ("reward", "pg_loss", "kl", "entropy", "grad_norm", "clipfrac", "approx_kl")
    runs = {}
    for name, overrides in {"one rank": [], "two ranks, micro-batches": ["job.trainer_ranks=2",
                                                                          "train.max_tokens_per_gpu=60"]}.items():
        _, run_dir = submit(tmp_path / name.replace(" ", "_").replace(",", ""), "train.steps=3", *overrides)
        rows, _, _ = first_last(run_dir)
        runs[name] = [[r[k] for k in keys] for r in rows]
    a, b = runs.values()
    assert len(a) == len(b) == 3
    for step_a, step_b in zip(a, b):
        assert step_a == pytest.approx(step_b, rel=1e-4, abs=1e-6), (keys, step_a, step_b)
    assert a[1][2] > 0  # the KL term is live from step 2 on, so it is compared too


def test_triton_kernels_in_the_loop_match_the_torch_references(tmp_path, monkeypatch):
    """The loop with the Triton kernels (under the interpreter on the CPU) computes what it computes with the
    torch references: same rewards, losses, entropy and grad norm."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    keys = ("reward", "pg_loss", "kl", "entropy", "grad_norm")
    runs = []
    for mode in ("torch", "triton"):
        _, run_dir = submit(tmp_path / mode, "train.steps=3", f"algo.kernels={mode}")
        rows, _, _ = first_last(run_dir)
        runs.append([[r[k] for k in keys] for r in rows])
    for a, b in zip(*runs):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5), (keys, a, b)


def test_old_log_probs_pass_only_with_several_mini_batches(tmp_path):
    """One optimizer step per batch: the old log-probs are the update pass's own, so the ratio is exactly 1 (no
    clipping, zero approximate KL). Several mini-batches: the separate old pass runs, and later mini-batches see the
    policy move (ratio != 1). Either way the engine's log-probs match the trainer's before the update."""
    _, one = submit(tmp_path / "one", "train.steps=6")
    _, four = submit(tmp_path / "four", "train.steps=6", "train.mini_batches=4")
    one, _, _ = first_last(one)
    four, _, _ = first_last(four)
    assert all(r["clipfrac"] == 0 and r["approx_kl"] == 0 for r in one)
    assert any(r["approx_kl"] != 0 for r in four) and max(r["clipfrac"] for r in four) > 0
    assert max(r["mismatch_abs"] for r in one + four) < 1e-4
