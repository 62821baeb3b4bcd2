"""GPU: the production policy on 2 NCCL ranks (1 when only one GPU): checkpoint loading against an unsharded
transformers model, and training equivalences (float32, tight tolerances): activation checkpointing, FSDP2 CPU
offload of parameters (grad-norm clip on host DTensors over gloo), host-resident AdamW state; LoRA in bf16."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

SHAPES = dict(vocab_size=503, hidden_size=128, intermediate_size=300, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, tie_word_embeddings=False, max_position_embeddings=256)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def batch(device):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, SHAPES["vocab_size"], (4, 33), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    loss_mask = (torch.arange(32) >= 8).float().expand(4, 32) * mask[:, 1:]
    return ids.to(device), mask.to(device), loss_mask.to(device)


def train(cfg, mesh, device, *, steps=2):
    """Two AdamW steps; returns the full float32 parameters and the policy."""
    from grpo.policy import build_optimizer, build_policy, gather_full, hf_named_parameters

    policy = build_policy(cfg, mesh, seed=0, trainable=True, device=device)
    opt = build_optimizer(policy, cfg, lr=1e-3, weight_decay=0.01)
    ids, mask, loss_mask = batch(device)
    for _ in range(steps):
        logp, ent = policy(ids, mask, loss_mask)
        (-(logp * loss_mask).sum() / loss_mask.sum() - 0.01 * (ent * loss_mask).mean()).backward()
        norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), 0.5)
        assert torch.isfinite(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
    full = {n: gather_full(p).float().cpu() for n, p in hf_named_parameters(policy)}
    return full, policy, opt


def worker(rank: int, world: int, port: int, ckpt: str) -> None:
    import os

    from torch.distributed.device_mesh import DeviceMesh
    from transformers import AutoModelForCausalLM

    from grpo.config import ModelConfig
    from grpo.policy import build_policy, build_reference, local_of

    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("cpu:gloo,cuda:nccl", rank=rank, world_size=world, device_id=device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        mesh = DeviceMesh.from_group(dist.group.WORLD, device_type="cuda")
        ids, mask, loss_mask = batch(device)

        # loading: sharded policy == unsharded transformers model
        base = ModelConfig(path=ckpt)
        policy = build_policy(base, mesh, seed=0, trainable=True, device=device)
        hf = AutoModelForCausalLM.from_pretrained(ckpt).float().to(device)
        with torch.no_grad():
            logp, _ = policy(ids, mask, loss_mask)
            want = torch.log_softmax(hf(input_ids=ids, attention_mask=mask).logits.double()[:, :-1], -1)
            want = want.gather(-1, ids[:, 1:, None])[..., 0]
        diff = ((logp.double() - want) * loss_mask).abs().max().item()
        assert diff < 1e-4, f"sharded policy vs transformers on GPU: max |dlogp| {diff:.2e}"
        del policy

        # training equivalences against the plain run
        ref_full, policy, opt = train(base, mesh, device)
        state_bytes = sum(local_of(t).nbytes for s in opt.state.values() for t in s.values() if t.dim() > 0)
        del policy, opt
        torch.cuda.empty_cache()
        resident = {}
        for name, cfg, tol in [("activation checkpointing", ModelConfig(path=ckpt, activation_checkpointing=True), 1e-6),
                               ("optimizer offload", ModelConfig(path=ckpt, optimizer_offload=True), 0.0),
                               ("param offload", ModelConfig(path=ckpt, param_offload=True, optimizer_offload=True),
                                1e-5)]:
            before = torch.cuda.memory_allocated()
            full, policy, opt = train(cfg, mesh, device)
            resident[name] = torch.cuda.memory_allocated() - before
            bad = [n for n in ref_full if not torch.allclose(full[n], ref_full[n], rtol=0, atol=tol)]
            worst = max((full[n] - ref_full[n]).abs().max().item() for n in ref_full)
            assert not bad, f"{name}: {len(bad)} tensors differ from the plain run (max {worst:.2e}), e.g. {bad[:2]}"
            states = [local_of(t) for s in opt.state.values() for t in s.values() if t.dim() > 0]
            if cfg.optimizer_offload or cfg.param_offload:
                assert states and all(t.device.type == "cpu" for t in states), f"{name}: AdamW state not on host"
            else:
                assert all(t.device.type == "cuda" for t in states)
            if cfg.param_offload:
                assert all(local_of(p).device.type == "cpu" for p in policy.parameters())
            del policy, opt
            torch.cuda.empty_cache()
        saved = resident["activation checkpointing"] - resident["optimizer offload"]
        assert saved >= 0.9 * state_bytes, f"optimizer offload freed {saved} B of GPU memory, AdamW state is {state_bytes} B"
        assert resident["param offload"] < 0.1 * resident["activation checkpointing"], resident

        # LoRA in bf16: base bf16, adapters float32; reference (adapters off) == policy while B == 0
        lora = ModelConfig(path=ckpt, dtype="bfloat16", lora_rank=8, lora_alpha=16, activation_checkpointing=True)
        policy = build_policy(lora, mesh, seed=0, trainable=True, device=device)
        reference = build_reference(lora, policy, mesh, seed=0, device=device)
        for n, p in policy.named_parameters():
            assert p.dtype == (torch.float32 if "lora_" in n else torch.bfloat16), (n, p.dtype)
        with torch.no_grad():
            a, _ = policy(ids, mask, loss_mask)
            b, _ = reference(ids, mask, loss_mask)
        assert torch.equal(a, b), "with B = 0 the adapters must not change the output"
        _, policy, _ = train(lora, mesh, device, steps=3)
        with torch.no_grad():
            a, _ = policy(ids, mask, loss_mask)
            b, _ = build_reference(lora, policy, mesh, seed=0, device=device)(ids, mask, loss_mask)
        assert ((a - b) * loss_mask).abs().max() > 1e-3, "LoRA training did not move the policy"
        dist.barrier()
    finally:
        dist.destroy_process_group()


@needs_cuda
def test_policy_on_gpus(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(**SHAPES)).save_pretrained(tmp_path / "ckpt", safe_serialization=True,
                                                             max_shard_size="1MB")
    world = min(2, torch.cuda.device_count())
    mp.spawn(worker, args=(world, free_port(), str(tmp_path / "ckpt")), nprocs=world, join=True)
