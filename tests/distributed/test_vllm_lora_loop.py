"""The loop with LoRA and the vLLM engine on the CPU: the trainers send merged weights (grpo.vllm_engine says why).

The stand-in engine of test_vllm_placement plays vLLM (its TP "workers" join the sync group as vLLM's do), here with
the plain model vLLM would run (no adapters) and every weight NaN until the first sync, as with load_format="dummy".
After a short run with two FSDP2 trainers its weights must equal the merged model the run exports, and the run's
metrics must match the same run with the native engine, which carries the adapters itself.
"""

import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from grpo.policy import ALL_LINEAR
from grpo.config import apply_overrides
from hpc.presets import get_preset
from tests.distributed.test_vllm_placement import StandInVLLM

LORA = ["model.lora_rank=4", "model.lora_alpha=8", "model.lora_targets=all-linear"]
STEPS = 3


class MergedStandIn(StandInVLLM):
    """vLLM in a LoRA run: the plain model, garbage until the first sync; keeps what each sync brought."""

    out_dir = None  # set in the rollout process

    def __init__(self, cfg, roles, device):
        rank = cfg.model.lora_rank
        cfg.model.lora_rank = 0  # vLLM runs without LoRA: it gets merged weights
        super().__init__(cfg, roles, device)
        cfg.model.lora_rank = rank
        with torch.no_grad():
            for p in self.native.model.parameters():
                p.fill_(float("nan"))
        self.num_syncs = 0

    def receive_weights(self):
        count = super().receive_weights()
        state = {k: v.clone() for k, v in self.native.model.named_parameters()}
        torch.save((count, state), f"{self.out_dir}/standin-{self.num_syncs}.pt")
        self.num_syncs += 1
        return count


def worker(rank, init_file, run_dir, engine, trainers, rollouts, tp, world):
    import grpo.loop as loop

    torch.set_num_threads(1)
    MergedStandIn.out_dir = run_dir
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        cfg = apply_overrides(get_preset("local"), [f"train.steps={STEPS}", f"rollout.engine={engine}", *LORA])
        loop.run(cfg, loop.Roles(trainers=trainers, rollouts=rollouts, device="cpu", tp=tp), run_dir,
                 make_engine=MergedStandIn if engine == "vllm" else None)
    finally:
        dist.destroy_process_group()


def run(tmp_path, name, engine, trainers, rollouts, tp):
    run_dir = tmp_path / name
    run_dir.mkdir()
    world = len(trainers) + len(rollouts)
    mp.spawn(worker, args=(str(tmp_path / f"{name}.init"), str(run_dir), engine, trainers, rollouts, tp, world),
             nprocs=world, join=True)
    return run_dir


def metrics(run_dir):
    keys = ("reward", "pg_loss", "kl", "entropy", "grad_norm", "response_len")
    return [[json.loads(line)[k] for k in keys] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_lora_with_vllm_standin_gets_the_merged_weights(tmp_path):
    vllm = run(tmp_path, "vllm-lora", "vllm", [0, 1], [2, 3], 2)
    syncs = [torch.load(vllm / f"standin-{i}.pt") for i in range(STEPS + 1)]  # the first sync, then one per step
    (first_count, first), last = syncs[0], syncs[-1][1]
    merged = load_file(str(vllm / "hf" / "model.safetensors"))  # the run's export: LoRA merged on full tensors
    assert set(first) == set(merged) and first_count == len(merged), "the first sync must bring every weight"
    adapted = {n for n in merged if n.endswith(tuple(f"{m}.weight" for m in ALL_LINEAR))}
    assert adapted and all(count == len(adapted) for count, _ in syncs[1:]), "later syncs: the adapted weights only"
    for name, want in merged.items():
        assert not torch.isnan(last[name]).any(), f"{name}: never loaded"
        torch.testing.assert_close(last[name], want, rtol=1e-6, atol=1e-6, msg=lambda m: f"{name}: {m}")
        if name in adapted:  # B moved away from zero: the merge shows
            assert not torch.equal(first[name], last[name]), f"{name}: training did not reach the engine"
        else:
            assert torch.equal(first[name], last[name]), f"{name} changed in a LoRA run"

    native = run(tmp_path, "native-lora", "native", [0, 1], [2], 1)
    for a, b in zip(metrics(vllm), metrics(native), strict=True):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6)
