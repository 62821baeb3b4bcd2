"""The loop's layouts on the CPU with real gloo processes: on-policy metrics unchanged by the loop's rebuild (a
golden file made by the loop before it, `tests/fixtures/on_policy_metrics.json`), one-step off-policy (the engine
generates batch k+1 while the trainer updates on batch k), and the colocated time-sharing protocol (the engine
sleeps after every generation and is woken before it takes weights or generates)."""

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from grpo.config import apply_overrides
from hpc.presets import get_preset

GOLDEN = Path(__file__).parents[1] / "fixtures" / "on_policy_metrics.json"


class CountingEngine:
    """The native engine, counting the time-sharing calls it gets (a wrapper, not a mock: it generates for real)."""

    log_dir = None

    def __init__(self, cfg, roles, device):
        import grpo.loop

        self.inner = grpo.loop.make_engine(cfg, roles, device)
        self.calls = []

    def generate(self, prompts, n, seed):
        self.calls.append("generate")
        return self.inner.generate(prompts, n, seed)

    def connect(self, link):
        self.inner.connect(link)

    def receive_weights(self):
        self.calls.append("receive")
        self.inner.receive_weights()

    def sleep(self):
        self.calls.append("sleep")
        self.inner.sleep()
        assert self.inner.engine._state is None  # the KV cache is gone
        Path(self.log_dir, "engine_calls.json").write_text(json.dumps(self.calls))

    def wake(self, tags=("weights", "kv_cache")):
        self.calls.append("wake:" + ",".join(tags))
        self.inner.wake(tags)

    def memory_stats(self):
        return self.inner.memory_stats()


def worker(rank, init_file, run_dir, overrides, time_share):
    import grpo.loop as loop

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    CountingEngine.log_dir = run_dir
    try:
        cfg = apply_overrides(get_preset("local"), ["train.export_hf=false", *overrides])
        roles = loop.Roles(trainers=[0], rollouts=[1], device="cpu", time_share=time_share)
        loop.run(cfg, roles, run_dir, make_engine=CountingEngine)
    finally:
        dist.destroy_process_group()


def run(tmp_path, name, *overrides, time_share=False):
    run_dir = tmp_path / name
    run_dir.mkdir()
    mp.spawn(worker, args=(str(tmp_path / f"{name}.init"), str(run_dir), list(overrides), time_share), nprocs=2,
             join=True)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()], run_dir


@pytest.mark.parametrize("name, overrides", [("default", []), ("mini_batches=2", ["train.mini_batches=2"])])
def test_on_policy_metrics_equal_the_loop_before_its_rebuild(tmp_path, name, overrides):
    golden = json.loads(GOLDEN.read_text())[name]
    # the golden file predates the presets' weight decay of 0.01 (verl's) and packed micro-batches: the same run is
    # the one without them (packed equals padded to float32 rounding: tests/unit/test_packing.py)
    rows, _ = run(tmp_path, "on", "train.steps=4", "train.weight_decay=0", "train.pack=false", *overrides)
    assert len(rows) == len(golden)
    for row, want in zip(rows, golden):
        # mismatch_abs is float32 noise (~1e-7) between trainer and engine log-probs; the engine's prefill now runs
        # packed, the same attention summed in another order, which moves that noise by up to ~1.3e-8
        assert row["mismatch_abs"] == pytest.approx(want.pop("mismatch_abs"), abs=5e-8)
        assert {k: row[k] for k in want} == pytest.approx(want, rel=1e-6, abs=1e-9)
        assert row["weights_age"] == 0


def test_off_policy_generates_the_next_batch_during_the_update(tmp_path):
    steps = 6
    rows, _ = run(tmp_path, "off", f"train.steps={steps}", "train.off_policy_steps=1")
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    # batch 1 comes from the initial weights; every later one from the weights one update older than the trainer's
    assert [r["weights_age"] for r in rows] == [0] + [1] * (steps - 1)
    for k in range(steps - 1):  # the generation of batch k+1 started before the update of batch k ended
        assert rows[k + 1]["gen_start_s"] < rows[k]["update_end_s"], (k, rows[k + 1], rows[k])
    for r in rows:  # verl's rollout correction is on (token level), its weights truncated at the threshold
        assert 0 < r["rollout_is_mean"] <= 2.0 and r["rollout_is_max"] > 0
        assert 0 <= r["rollout_is_truncated"] <= 1
    on, _ = run(tmp_path, "on", f"train.steps={steps}")
    for k in range(steps - 1):  # on-policy the engine waits for the update: no overlap
        assert on[k + 1]["gen_start_s"] > on[k]["update_end_s"]


def test_colocated_engine_sleeps_through_every_update(tmp_path):
    steps = 3
    rows, run_dir = run(tmp_path, "colo", f"train.steps={steps}", time_share=True)
    assert len(rows) == steps
    calls = json.loads((run_dir / "engine_calls.json").read_text())
    # the first weights, then per step: wake the cache, generate, sleep, wake the weights, take the new weights
    step = ["wake:kv_cache", "generate", "sleep", "wake:weights", "receive"]
    assert calls == step[3:] + step * (steps - 1) + step[:3]  # the log is written at the last sleep
