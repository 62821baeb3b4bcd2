"""The weight sync for every family: 2 FSDP2 trainer ranks (gloo) load a tiny Llama 3 / Qwen2 / Qwen3 / Mistral
folder, take one optimizer step, and send; the receiver's native engine (loaded from the same folder) must then
hold the trainer's full weights bit for bit, every tensor changed (biases, q/k norms included)."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh

from grpo.config import ModelConfig
from grpo.families import FAMILIES
from grpo.policy import build_lm, build_policy, hf_named_parameters
from grpo.rollout import NativeEngine
from grpo.tiny import save_tiny_checkpoint
from grpo.weight_sync import WeightReceiver, WeightSender

TRAINERS, RECEIVER = [0, 1], 2


def worker(rank: int, init_file: str, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=3)
    train_pg = dist.new_group(TRAINERS)
    sync_pg = dist.new_group([0, RECEIVER])
    cfg = ModelConfig(path=folder)
    try:
        if rank in TRAINERS:
            mesh = DeviceMesh.from_group(train_pg, device_type="cpu")
            policy = build_policy(cfg, mesh, seed=0, trainable=True, device=torch.device("cpu"))
            opt = torch.optim.AdamW(policy.parameters(), lr=1e-2)
            ids = torch.randint(3, 20, (4, 10), generator=torch.Generator().manual_seed(rank))
            logp, _ = policy(ids, torch.ones_like(ids), torch.ones(4, 9))
            (-logp.mean()).backward()
            opt.step()
            sender = WeightSender(hf_named_parameters(policy), sync_pg, src=0, bucket_bytes=4096)
            dist.broadcast_object_list([sender.specs if rank == 0 else None], src=0)
            sender.send()
            full = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True))
            box = [{k.removeprefix("lm."): v for k, v in full.items()} if rank == 0 else None]
            dist.broadcast_object_list(box, src=0)  # the check's own path, a pickle: not the protocol
        else:
            engine = NativeEngine(build_lm(cfg, seed=0), pad_id=0, eos_id=1, max_new_tokens=4)
            before = {k: v.clone() for k, v in engine.model.named_parameters()}
            box = [None]
            dist.broadcast_object_list(box, src=0)
            receiver = WeightReceiver(box[0], sync_pg, src=0, bucket_bytes=4096, device=torch.device("cpu"))
            loaded = engine.load_weights(receiver.receive())
            box = [None]
            dist.broadcast_object_list(box, src=0)
            expected = box[0]
            got = dict(engine.model.named_parameters())
            assert loaded == len(got) == len(expected)
            for name, tensor in expected.items():
                assert torch.equal(got[name], tensor), f"{name} differs after sync"
                assert not torch.equal(before[name], tensor), f"{name} was not changed by the sync"
            assert engine.generate([[5, 6, 7]], n=2, seed=0)[0][0].token_ids  # it still generates
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_each_family_syncs_bit_for_bit(tmp_path, model_type):
    folder = save_tiny_checkpoint(tmp_path / "model", model_type, seed=2)
    mp.spawn(worker, args=(str(tmp_path / "init"), str(folder)), nprocs=3, join=True)
