"""Weight sync: trainer -> rollout engines by bucketed broadcast on a dedicated process group.

Every trainer rank walks the tensors in one fixed order. Trainer rank `src` packs them into buckets of about
`bucket_bytes` and broadcasts each bucket over `group`, which spans `src` and every rollout rank. Receivers know the
bucket layout in advance (the specs are exchanged once, at start-up), so only raw bytes travel: no names, no pickles.
The same code runs on gloo (CPU) and NCCL (GPU).

How a bucket is filled on `src`:
- an FSDP2 parameter (a DTensor sharded on dim 0 over a 1-D mesh that contains `src`): every other trainer rank
  sends its own rows straight into the bucket (batched point-to-point on the trainer group), `src` copies its own.
  Only `src` ever holds a full tensor, nothing is gathered to the other trainers, and no unpacking copy is needed:
  the rows of rank r of a `torch.chunk` split are one contiguous byte range of the full tensor.
- any other DTensor (HSDP, TP, ...): `full_tensor()` on every trainer rank, `src` copies it in.
- a plain tensor: `src` copies its own.

Pipelining: two buckets are in flight. The broadcast of bucket k is asynchronous, so the gather of bucket k+1 (on the
trainer group's communicator) runs while bucket k is on the wire (on the sync group's communicator); a bucket buffer is
refilled only after its previous broadcast finished. With NCCL every wait is a stream wait, not a host sync. Receivers
keep two receives posted the same way, so the copy of bucket k into the engine overlaps the arrival of bucket k+1.

Computed tensors: besides parameters, the sender takes a `Computed` per name, a tensor made at send time (when its
bucket is filled) with the shape, dtype and placements of a given tensor: e.g. a LoRA layer's merged weight, whose
local rows each trainer rank computes from its own shards (grpo.policy.merged_named_tensors). Only a bucket's worth
exists at a time.

Static tensors: names marked `static` never change during the run (a LoRA run's base weights outside the adapted
layers). The first sync sends every tensor, later ones only the others; the specs say which, so both sides plan the
two bucket layouts alike.

Memory while a sync runs (a bucket here is the largest one: a tensor bigger than `bucket_bytes` gets its own): `src`
holds 2 buckets, every other trainer rank 2 buckets / trainer ranks, every receiver 2 buckets.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Callable, Collection, Iterator

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard

from grpo import hardware

ALIGN = 64  # byte alignment of each tensor in a bucket, so a uint8 slice can be viewed as any dtype
DEFAULT_BUCKET_BYTES = 1 << 30

# Measured end to end (FSDP2 shards -> weights loaded in the engine), one node, NVLink; see GPU_NOTES.md
# ("Weight sync and engines"). Across nodes the broadcast is bound by the NICs instead (about 40-50 GB/s for one
# 400 Gb/s NIC per GPU); pass that figure to expected_sync_seconds for rollout ranks on other nodes.
MEASURED_NVLINK_SYNC_GBPS = hardware.SYNC_GBPS_NVLINK


@dataclass(frozen=True)
class TensorSpec:
    name: str  # Hugging Face parameter name (or peft's, for adapter tensors)
    shape: tuple[int, ...]
    dtype: str  # e.g. "float32"
    offset: int = 0  # byte offset inside its bucket
    nbytes: int = 0
    static: bool = False  # never changes: sent by the first sync only


def dtype_of(name: str) -> torch.dtype:
    return getattr(torch, name)


def spec_of(name: str, tensor: torch.Tensor, dtype: torch.dtype | None = None, *, static: bool = False
            ) -> TensorSpec:
    dtype = dtype or tensor.dtype
    return TensorSpec(name, tuple(tensor.shape), str(dtype).removeprefix("torch."), static=static)


def sync_specs(specs: list[TensorSpec], index: int) -> list[TensorSpec]:
    """The tensors of sync number `index` (0 = the first): all of them, then only those not static."""
    return list(specs) if index == 0 else [s for s in specs if not s.static]


def plan_buckets(specs: list[TensorSpec], bucket_bytes: int) -> list[list[TensorSpec]]:
    """Group tensors, in order, into buckets of at most `bucket_bytes` (a larger tensor gets a bucket of its own)."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes={bucket_bytes}: the weight-sync bucket size must be positive")
    buckets, current, used = [], [], 0
    for spec in specs:
        nbytes = torch.Size(spec.shape).numel() * dtype_of(spec.dtype).itemsize
        if current and used + nbytes > bucket_bytes:
            buckets.append(current)
            current, used = [], 0
        current.append(TensorSpec(spec.name, spec.shape, spec.dtype, used, nbytes, spec.static))
        used += -(-nbytes // ALIGN) * ALIGN
    if current:
        buckets.append(current)
    return buckets


def bucket_size(bucket: list[TensorSpec]) -> int:
    last = bucket[-1]
    return last.offset + last.nbytes


def total_bytes(specs: list[TensorSpec]) -> int:
    """Payload bytes of one sync (what the planner divides by a bandwidth)."""
    return sum(torch.Size(s.shape).numel() * dtype_of(s.dtype).itemsize for s in specs)


def expected_sync_seconds(num_bytes: int, bandwidth_GBps: float = MEASURED_NVLINK_SYNC_GBPS) -> float:
    """Seconds one weight sync of `num_bytes` takes at an end-to-end bandwidth of `bandwidth_GBps` (1e9 B/s)."""
    if bandwidth_GBps <= 0:
        raise ValueError(f"bandwidth_GBps={bandwidth_GBps}: must be positive")
    return num_bytes / (bandwidth_GBps * 1e9)


def chunk_rows(dim0: int, num_shards: int, index: int) -> tuple[int, int]:
    """Rows [start, stop) of shard `index` when `torch.chunk` splits `dim0` rows in `num_shards` (FSDP2's rule)."""
    size = -(-dim0 // num_shards) if dim0 else 0
    return min(index * size, dim0), min((index + 1) * size, dim0)


class StatelessGroup:
    """A two-or-more-process group outside the default torch.distributed world.

    For engines whose workers live in processes of their own (vLLM's), which cannot join the job's default group:
    trainer rank `src` hosts a TCPStore at (host, port) as rank 0 of this group and every engine worker joins with
    its own rank. Only broadcasts from rank 0 are used.
    """

    def __init__(self, *, host: str, port: int, rank: int, world_size: int, backend: str,
                 timeout_s: float = 600.0):
        if backend not in ("nccl", "gloo"):
            raise ValueError(f"backend={backend!r}: the weight-sync group runs on 'nccl' or 'gloo'")
        timeout = datetime.timedelta(seconds=timeout_s)
        store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout)
        self.store = store  # keep the master alive as long as the group
        prefix = dist.PrefixStore("grpo-weight-sync", store)
        if backend == "nccl":
            self.pg = dist.ProcessGroupNCCL(prefix, rank, world_size)
        else:
            self.pg = dist.ProcessGroupGloo(prefix, rank, world_size, timeout)
        self.rank, self.world_size, self.backend = rank, world_size, backend

    def broadcast_from_root(self, tensor: torch.Tensor):
        opts = dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor = 0, 0
        return self.pg.broadcast([tensor], opts)


class CudaIpcGroup:
    """Weight sync between processes on ONE GPU (a trainer and an engine sharing it), where NCCL refuses two ranks
    on one device and gloo would take every bucket through host memory (0.9 s for 3 GB, measured on an H200).

    `src` copies each bucket into a CUDA buffer that every receiver has mapped through a CUDA IPC handle (sent once,
    and again when the buffer grows); a receiver copies it out device to device. `group` (gloo, spanning `src` and
    the receivers) carries the handshakes: "bucket ready" (with the handle when new), then a barrier, "every
    receiver has its copy", before the buffer is refilled. Each transfer is complete when `broadcast_from_root`
    returns, so the two-bucket pipelining of the callers degrades to one bucket at a time: the copies run at device
    memory speed, so the sync costs milliseconds.
    """

    def __init__(self, group, *, src: int):
        self.group, self.src = group, src
        self.is_src = dist.get_rank() == src
        self.shared = None

    def broadcast_from_root(self, tensor: torch.Tensor) -> "_Done":
        from torch.multiprocessing.reductions import reduce_tensor

        nbytes = tensor.numel() * tensor.element_size()
        flat = tensor.view(-1).view(torch.uint8)
        box = [None]
        if self.is_src:
            if self.shared is None or self.shared.numel() < nbytes:
                self.shared = torch.empty(nbytes, dtype=torch.uint8, device=tensor.device)
                box[0] = reduce_tensor(self.shared)
            self.shared[:nbytes].copy_(flat)
            torch.cuda.current_stream(tensor.device).synchronize()
        dist.broadcast_object_list(box, src=self.src, group=self.group)
        if not self.is_src:
            if box[0] is not None:
                rebuild, args = box[0]
                self.shared = rebuild(*args)
            flat.copy_(self.shared[:nbytes])
            torch.cuda.current_stream(tensor.device).synchronize()
        dist.barrier(group=self.group)
        return _Done()


class _Done:
    def wait(self) -> None:
        pass


def _broadcast(buf: torch.Tensor, *, src: int, group):
    """Asynchronous broadcast from `src` (a global rank; rank 0 of a StatelessGroup)."""
    if isinstance(group, (StatelessGroup, CudaIpcGroup)):
        return group.broadcast_from_root(buf)
    return dist.broadcast(buf, src=src, group=group, async_op=True)


@dataclass(frozen=True)
class Computed:
    """A tensor to send that `make()` returns at send time. `like` stands for it until then: the result has its
    shape, dtype and placements (for a DTensor, the same mesh and sharding). Every trainer rank calls `make()` for
    the same names in the same order, so it may run collectives over the trainer group."""
    like: torch.Tensor
    make: Callable[[], torch.Tensor]


@dataclass
class _Item:
    spec: TensorSpec
    param: torch.Tensor  # the parameter, or a Computed's `like`
    mode: str  # "rows": FSDP2 dim-0 shards sent point-to-point; "full": full_tensor(); "whole": src's own copy
    make: Callable[[], torch.Tensor] | None = None  # a Computed's; None: send `param`


def _train_group_of(param: torch.Tensor, src: int):
    """The trainer group of an FSDP2-style parameter whose rows can travel point-to-point, else None."""
    if not isinstance(param, DTensor):
        return None
    mesh = param.device_mesh
    if mesh.ndim != 1 or tuple(param.placements) != (Shard(0),) or not param.shape:
        return None
    group = mesh.get_group()
    return group if src in dist.get_process_group_ranks(group) else None


class WeightSender:
    """Called on every trainer rank (they all take part in the gathers); rank `src` broadcasts.

    `named_params` is the full list of (name, parameter or `Computed`), in the same order on every rank; `include`
    keeps only the names it returns True for (e.g. only LoRA adapter tensors); `static` names the tensors that never
    change (sent by the first `send()` only). `dtype` casts what travels (e.g. fp32 master weights sent as bf16).
    """

    def __init__(self, named_params: list[tuple[str, torch.Tensor | Computed]], group, *, src: int,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, dtype: torch.dtype | None = None,
                 include: Callable[[str], bool] | None = None, static: Collection[str] = (),
                 device: torch.device | None = None):
        named_params = [(n, p) for n, p in named_params if include is None or include(n)]
        if not named_params:
            raise ValueError("weight sync has no tensors to send: the include filter matched no parameter name")
        self.specs = [spec_of(name, _like(p), dtype, static=name in static)
                      for name, p in named_params]
        self.group, self.src = group, src
        self.device = device  # where buckets live; parameters offloaded to the host are copied there
        self.rank = dist.get_rank() if dist.is_initialized() else src  # a lone trainer process needs no job group
        self.is_src = self.rank == src
        groups = (_train_group_of(_like(p), src) for _, p in named_params)
        self.train_group = next((g for g in groups if g is not None), None)
        if self.train_group is not None:
            self.train_ranks = dist.get_process_group_ranks(self.train_group)
            self.my_index = self.train_ranks.index(self.rank)
        params = dict(named_params)
        self.plans = [self._plan(sync_specs(self.specs, index), params, bucket_bytes) for index in (0, 1)]
        self.buckets, self.items = self.plans[0]  # the first sync's layout (every tensor)
        self.num_sends = 0
        if self.train_group is not None:
            self._check_local_rows()

    def _plan(self, specs: list[TensorSpec], params: dict, bucket_bytes: int):
        """(buckets, items per bucket) of one sync layout."""
        buckets = plan_buckets(specs, bucket_bytes)
        items = []
        for bucket in buckets:
            row = []
            for spec in bucket:
                p = params[spec.name]
                make = p.make if isinstance(p, Computed) else None
                p = _like(p)
                if self.train_group is not None and _train_group_of(p, self.src) is self.train_group:
                    mode = "rows"
                else:
                    mode = "full" if isinstance(p, DTensor) else "whole"
                row.append(_Item(spec, p, mode, make))
            items.append(row)
        return buckets, items

    def _check_local_rows(self) -> None:
        for row in self.items:
            for item in row:
                if item.mode == "rows":
                    start, stop = chunk_rows(item.spec.shape[0], len(self.train_ranks), self.my_index)
                    local = item.param.to_local()
                    assert local.shape[0] == stop - start, (
                        f"{item.spec.name}: local shard has {local.shape[0]} rows, torch.chunk gives {stop - start}")

    @torch.no_grad()
    def send(self) -> int:
        """Broadcast every bucket of this sync once (the first sync: every tensor; later ones: all but the static
        ones); returns the bytes broadcast (0 on ranks other than `src`)."""
        buckets, items = self.plans[min(self.num_sends, 1)]
        self.num_sends += 1
        sent = 0
        bufs, pending = [None, None], [None, None]
        device = None
        for k, row in enumerate(items):
            slot = k % 2
            if pending[slot] is not None:  # the buffer's previous broadcast must be done before it is refilled
                pending[slot].wait()
                pending[slot] = None
            size = bucket_size(buckets[k])
            ops, keep = [], []
            buf = None
            if self.is_src:
                device = device or self.device or _device_of(row[0].param)
                if bufs[slot] is None or bufs[slot].numel() < size:
                    bufs[slot] = torch.empty(max(size, _max_bucket(buckets)), dtype=torch.uint8, device=device)
                buf = bufs[slot][:size]
            for item in row:
                spec, dtype = item.spec, dtype_of(item.spec.dtype)
                tensor = item.param if item.make is None else item.make()
                if item.mode == "rows":
                    ops += self._rows_ops(spec, tensor, buf, dtype, keep)
                elif item.mode == "full":
                    full = tensor.full_tensor()
                    if self.is_src:
                        _view(buf, spec).copy_(full)
                elif self.is_src:
                    _view(buf, spec).copy_(tensor.detach())
            if ops:
                for work in dist.batch_isend_irecv(ops):
                    work.wait()
            del keep
            if self.is_src:
                pending[slot] = _broadcast(buf, src=self.src, group=self.group)
                sent += size
        for work in pending:
            if work is not None:
                work.wait()
        return sent

    def _rows_ops(self, spec: TensorSpec, tensor: torch.Tensor, buf, dtype: torch.dtype, keep: list) -> list:
        """Point-to-point ops that put every trainer's rows of `tensor` into `buf` on src; src copies its own rows."""
        row_bytes = spec.nbytes // spec.shape[0]
        local = tensor.to_local()
        if self.device is not None:
            local = local.to(self.device, non_blocking=True)
        ops = []
        if self.is_src:
            full = _view(buf, spec)
            for index, peer in enumerate(self.train_ranks):
                start, stop = chunk_rows(spec.shape[0], len(self.train_ranks), index)
                if start == stop:
                    continue
                if peer == self.rank:
                    full[start:stop].copy_(local)
                else:
                    raw = buf[spec.offset + start * row_bytes:spec.offset + stop * row_bytes]
                    ops.append(dist.P2POp(dist.irecv, raw, peer, self.train_group))
        elif local.shape[0]:
            data = local.to(dtype).contiguous()
            keep.append(data)  # alive until the batch of ops is waited on
            ops.append(dist.P2POp(dist.isend, data.view(-1).view(torch.uint8), self.src, self.train_group))
        return ops


def _like(p: torch.Tensor | Computed) -> torch.Tensor:
    return p.like if isinstance(p, Computed) else p


def _device_of(param: torch.Tensor) -> torch.device:
    return param.to_local().device if isinstance(param, DTensor) else param.device


def _max_bucket(buckets: list[list[TensorSpec]]) -> int:
    return max(bucket_size(b) for b in buckets)


def _view(buf: torch.Tensor, spec: TensorSpec) -> torch.Tensor:
    """The bytes of `spec` inside its bucket, as a tensor of its dtype and shape."""
    return buf[spec.offset:spec.offset + spec.nbytes].view(dtype_of(spec.dtype)).view(spec.shape)


class WeightReceiver:
    """Called on every rollout rank: yields (name, tensor) views into the current bucket.

    `src` is the broadcasting trainer's global rank (ignored for a StatelessGroup, whose rank 0 it is). The first
    `receive()` takes every tensor of `specs`, later ones all but the static ones, as the sender sends them.
    """

    def __init__(self, specs: list[TensorSpec], group, *, src: int, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 device: torch.device):
        self.specs = list(specs)
        self.plans = [plan_buckets(sync_specs(self.specs, index), bucket_bytes) for index in (0, 1)]
        self.buckets = self.plans[0]  # the first sync's layout (every tensor)
        self.num_receives = 0
        self.group, self.src, self.device = group, src, torch.device(device)

    def receive(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Each yielded tensor is valid until the next bucket is consumed: copy it right away, on the current stream
        (the receive that reuses its buffer is ordered after the work queued there). Consume the whole iterator."""
        buckets = self.plans[min(self.num_receives, 1)]  # chosen now, not at the first next()
        self.num_receives += 1
        return self._receive(buckets)

    @torch.no_grad()
    def _receive(self, buckets: list[list[TensorSpec]]) -> Iterator[tuple[str, torch.Tensor]]:
        if not buckets:
            return
        cap = _max_bucket(buckets)
        bufs = [torch.empty(cap, dtype=torch.uint8, device=self.device) for _ in range(min(2, len(buckets)))]
        works = [None] * len(bufs)

        def post(k: int) -> None:
            slot = k % 2
            works[slot] = _broadcast(bufs[slot][:bucket_size(buckets[k])], src=self.src, group=self.group)

        for k in range(len(bufs)):
            post(k)
        for k, bucket in enumerate(buckets):
            slot = k % 2
            works[slot].wait()
            buf = bufs[slot]
            for spec in bucket:
                yield spec.name, _view(buf, spec)
            if k + 2 < len(buckets):
                post(k + 2)
