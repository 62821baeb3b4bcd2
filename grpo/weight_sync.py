"""Weight sync: trainer -> rollout engines by bucketed broadcast on a dedicated process group.

Every trainer rank walks the parameters in one fixed order and gathers each full tensor from its FSDP2 shards
(`DTensor.full_tensor()` is a collective over the trainer group); trainer rank `src` packs the bytes into buckets of
about `bucket_bytes` and broadcasts each bucket over `group`, which spans `src` and every rollout rank. Receivers
know the bucket layout in advance (it is exchanged once, at start-up), so only raw bytes travel: no names, no pickles.
The same code runs on gloo (CPU) and NCCL (GPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

ALIGN = 64  # byte alignment of each tensor in a bucket, so a uint8 slice can be viewed as any dtype


@dataclass(frozen=True)
class TensorSpec:
    name: str  # Hugging Face parameter name
    shape: tuple[int, ...]
    dtype: str  # e.g. "float32"
    offset: int = 0  # byte offset inside its bucket
    nbytes: int = 0


def dtype_of(name: str) -> torch.dtype:
    return getattr(torch, name)


def spec_of(name: str, tensor: torch.Tensor, dtype: torch.dtype | None = None) -> TensorSpec:
    dtype = dtype or tensor.dtype
    return TensorSpec(name, tuple(tensor.shape), str(dtype).removeprefix("torch."))


def plan_buckets(specs: list[TensorSpec], bucket_bytes: int) -> list[list[TensorSpec]]:
    """Group tensors, in order, into buckets of at most `bucket_bytes` (a larger tensor gets a bucket of its own)."""
    buckets, current, used = [], [], 0
    for spec in specs:
        nbytes = torch.Size(spec.shape).numel() * dtype_of(spec.dtype).itemsize
        if current and used + nbytes > bucket_bytes:
            buckets.append(current)
            current, used = [], 0
        current.append(TensorSpec(spec.name, spec.shape, spec.dtype, used, nbytes))
        used += -(-nbytes // ALIGN) * ALIGN
    if current:
        buckets.append(current)
    return buckets


def bucket_size(bucket: list[TensorSpec]) -> int:
    last = bucket[-1]
    return last.offset + last.nbytes


class WeightSender:
    """Called on every trainer rank (they all take part in the gathers); rank `src` broadcasts."""

    def __init__(self, named_params: list[tuple[str, torch.Tensor]], group, *, src: int, bucket_bytes: int,
                 dtype: torch.dtype | None = None):
        self.params = dict(named_params)
        self.specs = [spec_of(name, p, dtype) for name, p in named_params]
        self.buckets = plan_buckets(self.specs, bucket_bytes)
        self.group, self.src = group, src
        self.is_src = dist.get_rank() == src

    @torch.no_grad()
    def send(self) -> int:
        """Broadcast every bucket once; returns the bytes sent."""
        sent = 0
        for bucket in self.buckets:
            buf = None
            for spec in bucket:
                p = self.params[spec.name]
                full = p.full_tensor() if isinstance(p, DTensor) else p.detach()
                if self.is_src:
                    if buf is None:
                        buf = torch.empty(bucket_size(bucket), dtype=torch.uint8, device=full.device)
                    flat = full.to(dtype_of(spec.dtype)).contiguous().view(-1).view(torch.uint8)
                    buf[spec.offset:spec.offset + spec.nbytes].copy_(flat)
            if self.is_src:
                dist.broadcast(buf, src=self.src, group=self.group)
                sent += buf.numel()
        return sent


class WeightReceiver:
    """Called on every rollout rank: yields (name, tensor) views into the current bucket."""

    def __init__(self, specs: list[TensorSpec], group, *, src: int, bucket_bytes: int, device: torch.device):
        self.buckets = plan_buckets(specs, bucket_bytes)
        self.group, self.src, self.device = group, src, device

    @torch.no_grad()
    def receive(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Each yielded tensor is valid until the next bucket arrives: consume (copy) it right away."""
        for bucket in self.buckets:
            buf = torch.empty(bucket_size(bucket), dtype=torch.uint8, device=self.device)
            dist.broadcast(buf, src=self.src, group=self.group)
            for spec in bucket:
                raw = buf[spec.offset:spec.offset + spec.nbytes]
                yield spec.name, raw.view(dtype_of(spec.dtype)).view(spec.shape)
