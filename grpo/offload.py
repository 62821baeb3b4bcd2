"""Time-sharing a GPU between a trainer and an engine: the trainer's optimizer state leaves the GPU while the engine
generates, and comes back for the update.

Each state tensor keeps its identity (the optimizer holds it): its storage is copied to pinned host memory and
resized to nothing, then resized back and refilled. DTensor states are handled through their local shards, which
is what FSDP2 itself does with unsharded parameters.
"""

from __future__ import annotations

import torch


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


class OptimizerSwap:
    def __init__(self, opt: torch.optim.Optimizer):
        self.opt = opt
        self.host: dict[tuple, torch.Tensor] = {}  # (parameter id, state key) -> pinned host copy
        self.out = False

    def _entries(self):
        for param, state in self.opt.state.items():
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    local = _local(value)
                    if local.is_cuda and local.numel():
                        yield (id(param), key), local

    @torch.no_grad()
    def offload(self) -> int:
        """Move the GPU state to the host; returns the bytes moved."""
        if self.out:
            return 0
        moved = 0
        entries = list(self._entries())
        for key, t in entries:
            host = self.host.get(key)
            if host is None:
                host = self.host[key] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host.copy_(t, non_blocking=True)
            moved += t.numel() * t.element_size()
        if entries:
            torch.cuda.synchronize()
        for _, t in entries:
            t.untyped_storage().resize_(0)
        self.out = True
        return moved

    @torch.no_grad()
    def reload(self) -> None:
        if not self.out:
            return
        for key, t in self._entries():
            t.untyped_storage().resize_(t.numel() * t.element_size())
            t.copy_(self.host[key], non_blocking=True)
        self.out = False
