"""Benchmark: weight sync end to end (FSDP2 shards on the trainer ranks -> weights copied into the engine's model)
against a raw NCCL broadcast of the same bytes, in the same run.

    torchrun --nproc-per-node N -m grpo.bench.sync [--shapes qwen2-7b|tiny] [--buckets-mb 64,256,1024] [--reps 5]

The last rank is the rollout rank (a Qwen2 model of the same shapes, weights loaded through
`NativeEngine.load_weights`). Layouts, each timed for every bucket size:
- `1 trainer`: rank 0 alone (an FSDP2 mesh of one) -> the rollout rank;
- `K trainers` (N >= 3): ranks 0..N-2 form the FSDP2 mesh; their rows travel to rank 0 point-to-point while
  rank 0 broadcasts the previous bucket.
Per layout: `raw` is one broadcast of a flat buffer of the same size from rank 0 to the rollout rank; `per-param`
(K trainers only) is the TRL/OpenRLHF way (full_tensor() + broadcast + copy, one parameter at a time). After the last
sync of each layout the rollout rank checks every tensor against the trainer's full tensor, bit for bit (sent by a
plain point-to-point send of each full tensor: a different path from the one under test).
Prints a table; writes sync.json and appends sync.csv under $OUT (or --out).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import socket
import time

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from grpo.rollout import NativeEngine
from grpo.weight_sync import WeightReceiver, WeightSender

SHAPES = {
    # Qwen2-7B: hidden 3584, 28 layers, 28 heads / 4 KV heads of 128, MLP 18944, vocab 152064, untied head
    "qwen2-7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                     num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
    "tiny": dict(vocab_size=1000, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
}


def build_model(shapes: str, device: torch.device, dtype: torch.dtype):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(**SHAPES[shapes], max_position_embeddings=4096)
    with torch.device("meta"):
        model = Qwen2ForCausalLM(cfg)
    return model.to(dtype)


def materialise(model, device: torch.device, seed: int) -> None:
    """Random weights on the local shards only (DTensor's own RNG would broadcast a seed over the whole world).
    Buffers (rotary tables) stay uninitialised: nothing here runs the model."""
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            local = p.to_local() if isinstance(p, DTensor) else p
            local.normal_(0.0, 0.02, generator=gen)


def timed(fn, *, reps: int, device: torch.device, group=None) -> list[float]:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier(group=group)

    fn()  # warm-up
    sync()
    out = []
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t)
    return out


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2]


def run_layout(name: str, trainers: list[int], recv: int, args, device, dtype, results: list) -> None:
    rank = dist.get_rank()
    train_pg = dist.new_group(trainers)
    sync_pg = dist.new_group([trainers[0], recv])
    everyone = dist.new_group(sorted({*trainers, recv}))
    src = trainers[0]
    member = rank in trainers or rank == recv
    model = engine = None
    if rank in trainers:
        model = build_model(args.shapes, device, dtype)
        mesh = DeviceMesh.from_group(train_pg, device_type=device.type)
        for block in model.model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        materialise(model, device, seed=1234 + rank)
        named = list(model.named_parameters())
    elif rank == recv:
        model = build_model(args.shapes, device, dtype)
        materialise(model, device, seed=7)
        engine = NativeEngine(model, pad_id=0, eos_id=1, max_new_tokens=1)
        named = list(model.named_parameters())
    if not member:
        return
    nbytes = sum(p.numel() * p.element_size() for _, p in named)
    flat = torch.empty(nbytes, dtype=torch.uint8, device=device) if rank in (src, recv) else None

    def raw():
        if rank in (src, recv):
            dist.broadcast(flat, src=src, group=sync_pg)

    row = {"layout": name, "trainers": len(trainers), "bytes": nbytes, "tensors": len(named)}
    row["raw_s"] = median(timed(raw, reps=args.reps, device=device, group=everyone))
    if len(trainers) > 1 and args.per_param:
        def per_param():
            for pname, p in named:
                if rank in trainers:
                    full = p.full_tensor()
                    if rank == src:
                        dist.broadcast(full, src=src, group=sync_pg)
                else:
                    buf = torch.empty(p.shape, dtype=p.dtype, device=device)
                    dist.broadcast(buf, src=src, group=sync_pg)
                    with torch.no_grad():
                        p.copy_(buf)
        row["per_param_s"] = median(timed(per_param, reps=max(2, args.reps // 2), device=device, group=everyone))
    specs = None
    if rank == src:
        specs = WeightSender(named, sync_pg, src=src, bucket_bytes=1 << 30).specs
    box = [specs]
    dist.broadcast_object_list(box, src=src, group=everyone)
    specs = box[0]
    for mb in args.buckets_mb:
        if rank in trainers:
            sender = WeightSender(named, sync_pg, src=src, bucket_bytes=mb << 20)
            modes = sorted({item.mode for r in sender.items for item in r})
            fn = sender.send
        else:
            receiver = WeightReceiver(specs, sync_pg, src=src, bucket_bytes=mb << 20, device=device)
            modes = None
            fn = lambda: engine.load_weights(receiver.receive())  # noqa: E731
        times = timed(fn, reps=args.reps, device=device, group=everyone)
        results.append({**row, "bucket_mb": mb, "sync_s": median(times), "sync_all_s": times,
                        "modes": modes, "buckets": len((sender if rank in trainers else receiver).buckets)})
    row_check = check_equal(named, trainers, src, recv, device, everyone)
    for r in results:
        if r["layout"] == name:
            r["bit_exact"] = row_check
    del flat, model, engine, named
    if device.type == "cuda":
        torch.cuda.empty_cache()


def check_equal(named, trainers, src, recv, device, group) -> bool:
    """The rollout rank's tensors against the trainer's full tensors, bit for bit; every rank gets the verdict."""
    rank = dist.get_rank()
    ok = True
    for _, p in named:
        if rank in trainers:
            full = p.full_tensor() if isinstance(p, DTensor) else p.detach()
            if rank == src:
                dist.send(full.contiguous(), dst=recv)
        else:
            got = torch.empty(p.shape, dtype=p.dtype, device=device)
            dist.recv(got, src=src)
            ok = ok and torch.equal(got, p.detach())
    verdict = [ok if rank == recv else None]
    dist.broadcast_object_list(verdict, src=recv, group=group)
    return bool(verdict[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="qwen2-7b", choices=sorted(SHAPES))
    ap.add_argument("--buckets-mb", default="64,256,1024", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--per-param", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--out", default=os.environ.get("OUT", ""))
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    if world < 2:
        raise SystemExit("run with at least 2 processes: torchrun --nproc-per-node 2 -m grpo.bench.sync")
    dtype = torch.bfloat16
    recv = world - 1
    results: list[dict] = []
    run_layout("1 trainer", [0], recv, args, device, dtype, results)
    if world >= 3:
        run_layout(f"{world - 1} trainers", list(range(world - 1)), recv, args, device, dtype, results)
    if rank == 0:
        report(results, args, device)
    dist.barrier()
    dist.destroy_process_group()


def report(results: list[dict], args, device) -> None:
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    meta = {"date": datetime.date.today().isoformat(), "card": card, "torch": torch.__version__,
            "shapes": args.shapes, "host": socket.gethostname()}
    print(f"weight sync, {args.shapes} shapes, bf16, {results[0]['bytes'] / 1e9:.2f} GB in {results[0]['tensors']} "
          f"tensors; {card}")
    print(f"{'layout':<12} {'bucket':>7} {'raw ms':>8} {'sync ms':>8} {'x raw':>6} {'GB/s':>7} {'per-param ms':>13} "
          f"{'bit-exact':>9}")
    for r in results:
        pp = f"{r['per_param_s'] * 1e3:13.1f}" if "per_param_s" in r else f"{'-':>13}"
        print(f"{r['layout']:<12} {r['bucket_mb']:>5}MB {r['raw_s'] * 1e3:8.1f} {r['sync_s'] * 1e3:8.1f} "
              f"{r['sync_s'] / r['raw_s']:6.2f} {r['bytes'] / r['sync_s'] / 1e9:7.1f} {pp} {str(r['bit_exact']):>9}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "sync.json"), "w") as f:
            json.dump({**meta, "results": results}, f, indent=1)
        path = os.path.join(args.out, "sync.csv")
        fields = ["date", "card", "torch", "shapes", "layout", "bucket_mb", "bytes", "raw_s", "sync_s", "per_param_s",
                  "bit_exact"]
        new = not os.path.exists(path)
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            if new:
                w.writeheader()
            for r in results:
                w.writerow({**meta, **r})


if __name__ == "__main__":
    main()
