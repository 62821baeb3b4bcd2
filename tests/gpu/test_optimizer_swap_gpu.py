"""grpo.offload.OptimizerSwap on one GPU with FSDP2 (a one-rank NCCL group): the AdamW state leaves the GPU for
generation and comes back for the update, and training is bit for bit what it is without the swap."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from grpo.offload import OptimizerSwap


@pytest.fixture(scope="module")
def group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    yield
    dist.destroy_process_group()


def trained(swap: bool, steps: int = 3):
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(8)]).cuda()
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    swapper = OptimizerSwap(opt) if swap else None
    gen = torch.Generator(device="cuda").manual_seed(1)
    freed = []
    for _ in range(steps):
        if swapper is not None:
            swapper.reload()  # the update
        x = torch.randn(64, 1024, device="cuda", generator=gen)
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if swapper is not None:  # generation: the state leaves the GPU
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            moved = swapper.offload()
            freed.append((before - torch.cuda.memory_allocated(), moved))
    if swapper is not None:
        swapper.reload()
    return [p.detach().full_tensor().cpu() for p in model.parameters()], opt, freed


def test_swap_frees_the_state_and_changes_nothing(group):
    plain, _, _ = trained(swap=False)
    swapped, opt, freed = trained(swap=True)
    for a, b in zip(plain, swapped):
        assert torch.equal(a, b)
    state_bytes = sum(v.to_local().numel() * v.to_local().element_size() for s in opt.state.values()
                      for v in s.values() if isinstance(v, torch.Tensor) and v.dim())
    assert state_bytes > 60e6  # exp_avg and exp_avg_sq of 8.4 M float32 parameters
    for released, moved in freed:
        assert moved >= state_bytes and released >= 0.9 * state_bytes, (released, moved, state_bytes)
