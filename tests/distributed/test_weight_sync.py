"""Weight sync across real processes: 2 FSDP2 trainer ranks (gloo) and 1 receiver with the native engine.

After a training step the receiver's weights must equal the trainer's full weights bit for bit.
"""


import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh

from grpo.config import ModelConfig
from grpo.policy import build_policy, hf_named_parameters
from grpo.rollout import NativeEngine
from grpo.tiny import build_tiny_model
from grpo.weight_sync import WeightReceiver, WeightSender

TRAINERS, RECEIVER = [0, 1], 2


def worker(rank: int, init_file: str, bucket_bytes: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=3)
    train_pg = dist.new_group(TRAINERS)
    sync_pg = dist.new_group([0, RECEIVER])
    try:
        if rank in TRAINERS:
            mesh = DeviceMesh.from_group(train_pg, device_type="cpu")
            policy = build_policy(ModelConfig(), mesh, seed=0, trainable=True, device=torch.device("cpu"))
            opt = torch.optim.AdamW(policy.parameters(), lr=1e-2)
            g = torch.Generator().manual_seed(rank)
            ids = torch.randint(3, 20, (4, 10), generator=g)
            logp, _ = policy(ids, torch.ones_like(ids), torch.ones(4, 9))
            (-logp.mean()).backward()
            opt.step()
            sender = WeightSender(hf_named_parameters(policy), sync_pg, src=0, bucket_bytes=bucket_bytes)
            box = [sender.specs if rank == 0 else None]
            dist.broadcast_object_list(box, src=0)
            sent = sender.send()
            full = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True))
            box = [({k.removeprefix("lm."): v for k, v in full.items()}, sent) if rank == 0 else None]
            dist.broadcast_object_list(box, src=0)  # the check's own path, a pickle: not the protocol
        else:
            engine = NativeEngine(build_tiny_model(seed=123), pad_id=0, eos_id=1, max_new_tokens=4)
            before = {k: v.clone() for k, v in engine.model.state_dict().items()}
            box = [None]
            dist.broadcast_object_list(box, src=0)
            receiver = WeightReceiver(box[0], sync_pg, src=0, bucket_bytes=bucket_bytes, device=torch.device("cpu"))
            loaded = engine.load_weights(receiver.receive())
            box = [None]
            dist.broadcast_object_list(box, src=0)
            expected, sent = box[0]
            got = dict(engine.model.named_parameters())
            assert loaded == len(got) == len(expected)
            for name, tensor in expected.items():
                assert torch.equal(got[name], tensor), f"{name} differs after sync"
                assert not torch.equal(before[name], tensor), f"{name} was not changed by the sync"
            assert sent >= sum(t.numel() * t.element_size() for t in expected.values())
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("bucket_bytes", [4096, 1 << 30], ids=["many-buckets", "one-bucket"])
def test_receiver_equals_trainer_bit_for_bit(tmp_path, bucket_bytes):
    mp.spawn(worker, args=(str(tmp_path / "init"), bucket_bytes), nprocs=3, join=True)


# --- three FSDP2 trainers (uneven torch.chunk shards), bf16 on the wire, LoRA filter, stateless group -------------

TRAINERS3, RECEIVER3 = [0, 1, 2], 3


def _lora(model, seed: int):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)  # init_lora_weights=False: random A and B, different per seed
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))


def _is_lora(name: str) -> bool:
    return ".lora_" in name


def worker3(rank: int, init_file: str) -> None:
    from torch.distributed.fsdp import fully_shard

    from grpo.weight_sync import StatelessGroup

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=4)
    train_pg = dist.new_group(TRAINERS3)
    sync_pg = dist.new_group([0, RECEIVER3])
    bucket = 8192
    try:
        port_box = [_free_port() if rank == 0 else None]
        dist.broadcast_object_list(port_box, src=0)
        if rank in TRAINERS3:
            mesh = DeviceMesh.from_group(train_pg, device_type="cpu")
            policy = build_policy(ModelConfig(), mesh, seed=0, trainable=True, device=torch.device("cpu"))
            named = hf_named_parameters(policy)
            assert any(p.shape[0] % 3 for _, p in named), "the test wants uneven shards"
            sender = WeightSender(named, sync_pg, src=0, bucket_bytes=bucket, dtype=torch.bfloat16)
            assert {item.mode for row in sender.items for item in row} == {"rows"}
            dist.broadcast_object_list([sender.specs if rank == 0 else None], src=0)
            sender.send()
            # the same weights again, over a group outside the default world (as vLLM's workers join it)
            if rank == 0:
                stateless = StatelessGroup(host="127.0.0.1", port=port_box[0], rank=0, world_size=2, backend="gloo")
                WeightSender(named, stateless, src=0, bucket_bytes=bucket, dtype=torch.bfloat16).send()
            else:
                WeightSender(named, None, src=0, bucket_bytes=bucket, dtype=torch.bfloat16).send()
            full = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True))
            expected = {k.removeprefix("lm."): v.to(torch.bfloat16) for k, v in full.items()}

            # LoRA: only the adapter tensors travel, under peft's names
            lora = _lora(build_tiny_model(seed=0), seed=1)
            for layer in lora.base_model.model.model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(lora, mesh=mesh)
            lora_sender = WeightSender(list(lora.named_parameters()), sync_pg, src=0, bucket_bytes=bucket,
                                       include=_is_lora)
            dist.broadcast_object_list([lora_sender.specs if rank == 0 else None], src=0)
            lora_sender.send()
            lora_full = get_model_state_dict(lora, options=StateDictOptions(full_state_dict=True))
            box = [(expected, {k: v for k, v in lora_full.items()}) if rank == 0 else None]
            dist.broadcast_object_list(box, src=0)  # the check's own path, a pickle: not the protocol
        else:
            engine = NativeEngine(build_tiny_model(seed=123).to(torch.bfloat16), pad_id=0, eos_id=1,
                                  max_new_tokens=4)
            box = [None]
            dist.broadcast_object_list(box, src=0)
            specs = box[0]
            assert {s.dtype for s in specs} == {"bfloat16"}
            receiver = WeightReceiver(specs, sync_pg, src=0, bucket_bytes=bucket, device=torch.device("cpu"))
            assert len(receiver.buckets) > 3
            assert engine.load_weights(receiver.receive()) == len(specs)
            first = {k: v.clone() for k, v in engine.model.named_parameters()}
            with torch.no_grad():
                for p in engine.model.parameters():
                    p.zero_()
            stateless = StatelessGroup(host="127.0.0.1", port=port_box[0], rank=1, world_size=2, backend="gloo")
            receiver = WeightReceiver(specs, stateless, src=0, bucket_bytes=bucket, device=torch.device("cpu"))
            assert engine.load_weights(receiver.receive()) == len(specs)

            lora = _lora(build_tiny_model(seed=0), seed=2)
            base_before = {k: v.clone() for k, v in lora.named_parameters() if not _is_lora(k)}
            box = [None]
            dist.broadcast_object_list(box, src=0)
            lora_specs = box[0]
            assert lora_specs and all(_is_lora(s.name) for s in lora_specs)
            params = dict(lora.named_parameters())
            with torch.no_grad():
                for name, tensor in WeightReceiver(lora_specs, sync_pg, src=0, bucket_bytes=bucket,
                                                   device=torch.device("cpu")).receive():
                    params[name].copy_(tensor)
            box = [None]
            dist.broadcast_object_list(box, src=0)
            expected, lora_expected = box[0]
            got = dict(engine.model.named_parameters())
            for name, tensor in expected.items():
                assert torch.equal(first[name], tensor), f"{name} differs after sync (default group)"
                assert torch.equal(got[name], tensor), f"{name} differs after sync (stateless group)"
            for name in lora_expected:
                if _is_lora(name):
                    assert torch.equal(params[name], lora_expected[name]), f"{name} (LoRA) differs after sync"
                else:
                    assert torch.equal(params[name], base_before[name]), f"{name} (base) changed"
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_three_uneven_trainers_bf16_lora_and_stateless_group(tmp_path):
    mp.spawn(worker3, args=(str(tmp_path / "init"),), nprocs=4, join=True)
