"""GPU: the weight sync over NCCL (FSDP2 trainers -> a rollout rank, on the job's group and on a stateless group) and
the native engine it feeds (CUDA-graph decode against eager decode and against a full forward)."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
needs_2 = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")

SHAPES = dict(vocab_size=1000, hidden_size=256, intermediate_size=640, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, tie_word_embeddings=False, max_position_embeddings=1024)


def build(seed: int, dtype: torch.dtype, device):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2ForCausalLM(Qwen2Config(**SHAPES, attn_implementation="sdpa"))
    return model.to(dtype)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sync_worker(rank: int, world: int, init_file: str, port: int) -> None:
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    from grpo.rollout import NativeEngine
    from grpo.weight_sync import StatelessGroup, WeightReceiver, WeightSender, bucket_size

    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=world, device_id=device)
    trainers, recv = list(range(world - 1)), world - 1
    train_pg = dist.new_group(trainers)
    sync_pg = dist.new_group([0, recv])
    bucket = 256 << 10
    try:
        if rank in trainers:
            model = build(0, torch.float32, device)  # float32 master weights, bf16 on the wire
            mesh = DeviceMesh.from_group(train_pg, device_type="cuda")
            for block in model.model.layers:
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
            ids = torch.randint(0, 1000, (2, 16), device=device, generator=torch.Generator(device).manual_seed(rank))
            model(ids).logits.float().logsumexp(-1).mean().backward()
            opt.step()
            named = list(model.named_parameters())
            sender = WeightSender(named, sync_pg, src=0, bucket_bytes=bucket, dtype=torch.bfloat16)
            assert {item.mode for row in sender.items for item in row} == {"rows"}
            dist.broadcast_object_list([sender.specs if rank == 0 else None], src=0)
            sent = sender.send()
            if rank == 0:
                group = StatelessGroup(host="127.0.0.1", port=port, rank=0, world_size=2, backend="nccl")
                WeightSender(named, group, src=0, bucket_bytes=bucket, dtype=torch.bfloat16).send()
            else:
                WeightSender(named, None, src=0, bucket_bytes=bucket, dtype=torch.bfloat16).send()
            for _, p in named:  # the check's own path: one plain send per full tensor
                full = p.full_tensor().to(torch.bfloat16)
                if rank == 0:
                    dist.send(full, dst=recv)
            if rank == 0:
                assert sent == sum(bucket_size(b) for b in sender.buckets)
        else:
            engine = NativeEngine(build(123, torch.bfloat16, device), pad_id=0, eos_id=1, max_new_tokens=4)
            box = [None]
            dist.broadcast_object_list(box, src=0)
            specs = box[0]
            receiver = WeightReceiver(specs, sync_pg, src=0, bucket_bytes=bucket, device=device)
            assert len(receiver.buckets) > 4
            assert engine.load_weights(receiver.receive()) == len(specs)
            first = {n: p.detach().clone() for n, p in engine.model.named_parameters()}
            with torch.no_grad():
                for p in engine.model.parameters():
                    p.zero_()
            group = StatelessGroup(host="127.0.0.1", port=port, rank=1, world_size=2, backend="nccl")
            engine.load_weights(WeightReceiver(specs, group, src=0, bucket_bytes=bucket, device=device).receive())
            params = dict(engine.model.named_parameters())
            for spec in specs:
                want = torch.empty(spec.shape, dtype=torch.bfloat16, device=device)
                dist.recv(want, src=0)
                assert torch.equal(first[spec.name], want), f"{spec.name}: differs after sync (job group)"
                assert torch.equal(params[spec.name], want), f"{spec.name}: differs after sync (stateless group)"
        dist.barrier()
    finally:
        dist.destroy_process_group()


@needs_2
def test_nccl_sync_bit_exact(tmp_path):
    world = min(torch.cuda.device_count(), 4)
    mp.spawn(sync_worker, args=(world, str(tmp_path / "init"), free_port()), nprocs=world, join=True)


@needs_cuda
def test_native_engine_cuda_graphs_match_eager_and_forward():
    from grpo.rollout import NativeEngine

    model = build(0, torch.float32, "cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    prompts = [[5, 6, 7, 8], list(range(20, 45)), [9]]
    graphs = NativeEngine(model, pad_id=0, eos_id=1, max_new_tokens=40, cuda_graphs=True)
    eager = NativeEngine(model, pad_id=0, eos_id=1, max_new_tokens=40, cuda_graphs=False)
    a = graphs.generate(prompts, n=4, seed=3)
    b = eager.generate(prompts, n=4, seed=3)
    assert graphs._state["graph"] is not None
    assert [[c.token_ids for c in g] for g in a] == [[c.token_ids for c in g] for g in b]
    worst = 0.0
    for p, group in zip(prompts, a):
        for c in group:
            with torch.no_grad():
                logits = model(torch.tensor([p + c.token_ids], device="cuda")).logits[0].double()
            ids = torch.tensor(c.token_ids, device="cuda")[:, None]
            ref = torch.log_softmax(logits, -1)[len(p) - 1:-1].gather(-1, ids).squeeze(-1).cpu()
            worst = max(worst, (ref - torch.tensor(c.logprobs, dtype=torch.float64)).abs().max().item())
    assert worst < 1e-3, worst
    again = graphs.generate(prompts, n=4, seed=3)  # the captured graph, replayed for a second call
    assert [[c.token_ids for c in g] for g in again] == [[c.token_ids for c in g] for g in a]
