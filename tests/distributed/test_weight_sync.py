"""Weight sync across real processes: 2 FSDP2 trainer ranks (gloo) and 1 receiver with the native engine.

After a training step the receiver's weights must equal the trainer's full weights bit for bit.
"""

import os

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
