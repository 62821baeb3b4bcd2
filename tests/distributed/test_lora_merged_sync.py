"""LoRA weights for vLLM: the trainer sends W + (alpha/r) B A under the Hugging Face names (grpo.vllm_engine says
why). Real processes: 1 to 3 trainer ranks (FSDP2 over gloo, or one unsharded trainer) and 1 receiver.

What the receiver gets is checked against peft's own merge (`LoraLayer.merge()`) of the trainers' full state in
float64, after B was set to random non-zero values (peft starts B at zero, which would hide a missing merge). The
first sync carries every weight, the second only the adapted ones, with the values of the adapters at that time.
"""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh

from grpo.config import ModelConfig
from grpo.policy import (build_policy, copy_rows, hf_name, inject_lora, is_adapter, lora_layers, lora_spec,
                         sharded_named_parameters, sync_named_tensors)
from grpo.tiny import build_tiny_model
from grpo.weight_sync import WeightReceiver, WeightSender

TARGETS = "q_proj,v_proj,down_proj"  # a subset: the other linears are sent once, like the embeddings and norms
BUCKET = 4096


def model_config(dtype: str) -> ModelConfig:
    return ModelConfig(dtype=dtype, lora_rank=4, lora_alpha=8, lora_targets=TARGETS)


@torch.no_grad()
def randomize_b(policy, seed: int) -> None:
    """Every rank draws every full B in the same order and keeps its rows (as grpo.policy.init_adapters does)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in sharded_named_parameters(policy):
        if ".lora_B." in name:
            copy_rows(p, torch.randn(p.shape, generator=gen) * 0.5)


def full_state(policy) -> dict[str, torch.Tensor]:
    state = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True))
    return {k.removeprefix("lm."): v.clone() for k, v in state.items()}


def peft_merged(state: dict[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    """peft's merge of the trainers' full state, in float64, under Hugging Face names."""
    lm = build_tiny_model(seed=0)
    inject_lora(lm, lora_spec(model_config(dtype)))
    lm.double().load_state_dict({k: v.double() for k, v in state.items()})
    with torch.no_grad():
        for layer in lora_layers(lm):
            layer.merge()
    return {hf_name(k): v for k, v in lm.state_dict().items() if not is_adapter(k)}


def trainer(rank, sharded, dtype, train_pg, sync_pg, receiver_rank):
    mesh = DeviceMesh.from_group(train_pg, device_type="cpu") if sharded else None
    policy = build_policy(model_config(dtype), mesh, seed=0, trainable=True, device=torch.device("cpu"))
    randomize_b(policy, seed=1)
    named, static = sync_named_tensors(policy, merge_lora=True)
    sender = WeightSender(named, sync_pg, src=0, bucket_bytes=BUCKET, dtype=getattr(torch, dtype), static=static)
    if sharded:
        assert {item.mode for row in sender.items for item in row} == {"rows"}
    if rank == 0:  # the check's own path, a pickle: not the protocol
        dist.send_object_list([sender.specs], dst=receiver_rank)
    states = [full_state(policy)]
    first = sender.send()
    randomize_b(policy, seed=2)  # "a training step": only the adapters change
    states.append(full_state(policy))
    second = sender.send()
    if rank == 0:
        assert 0 < second < first
        dist.send_object_list([states], dst=receiver_rank)


def receiver(dtype, sync_pg):
    box = [None]
    dist.recv_object_list(box, src=0)
    specs = box[0]
    recv = WeightReceiver(specs, sync_pg, src=0, bucket_bytes=BUCKET, device=torch.device("cpu"))
    syncs = [{name: t.clone() for name, t in recv.receive()} for _ in range(2)]
    dist.recv_object_list(box, src=0)
    states = box[0]

    targeted = {s.name for s in specs if not s.static}
    assert targeted and all(name.endswith(tuple(f"{m}.weight" for m in TARGETS.split(","))) for name in targeted)
    assert {s.dtype for s in specs} == {dtype}
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == "float32" else dict(rtol=2**-7, atol=1e-5)  # bf16: one ulp
    for index, (sync, state) in enumerate(zip(syncs, states)):
        want = peft_merged(state, dtype)
        assert set(sync) == (set(want) if index == 0 else targeted), "first sync: every weight; then the adapted"
        for name, got in sync.items():
            torch.testing.assert_close(got.double(), want[name], **tol, msg=lambda m: f"sync {index}, {name}: {m}")
            if name in targeted:
                base = state[name.removesuffix(".weight") + ".base_layer.weight"].double()
                assert (got.double() - base).abs().max() > 1e-2, f"{name}: sent unmerged"
    assert all(not torch.equal(syncs[0][n], syncs[1][n]) for n in targeted), "the second sync must bring new B"


def worker(rank, init_file, num_trainers, sharded, dtype):
    torch.set_num_threads(1)
    world = num_trainers + 1
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    train_pg = dist.new_group(list(range(num_trainers)))
    sync_pg = dist.new_group([0, num_trainers])
    try:
        if rank < num_trainers:
            trainer(rank, sharded, dtype, train_pg, sync_pg, num_trainers)
        else:
            receiver(dtype, sync_pg)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("num_trainers,sharded,dtype", [(1, False, "float32"), (1, True, "bfloat16"),
                                                         (2, True, "bfloat16"), (3, True, "float32")],
                         ids=["1-unsharded-fp32", "1-fsdp-bf16", "2-fsdp-bf16", "3-fsdp-fp32"])
def test_merged_weights_equal_peft_merge(tmp_path, num_trainers, sharded, dtype):
    mp.spawn(worker, args=(str(tmp_path / "init"), num_trainers, sharded, dtype), nprocs=num_trainers + 1,
             join=True)
