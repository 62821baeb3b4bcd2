"""Benchmark: GRPO update steps of the production policy (grpo.policy) on GPUs, full fine-tuning and LoRA.

    python -m grpo.bench.train [--gpus 2] [--shapes qwen2.5-1.5b|tiny] [--steps 3] [--variants full,lora,...]

Spawns one process per GPU (NCCL; no torchrun). Rank 0 first writes a random checkpoint of the chosen shapes to
local disk (safetensors shards + index, bf16), then every variant loads it through `build_policy` (meta device,
FSDP2, each rank reading only its rows), so the real loading path is timed too. Per step and GPU: the old log-prob
pass, the reference pass (a frozen bf16 copy; for LoRA the policy with adapters disabled), and the update (per
micro-batch: forward, `policy_loss` + low_var_kl KL at 0.001, backward; then grad-norm clip and AdamW).
Batch: `--seqs` sequences of `--prompt` + `--response` tokens over all GPUs, micro-batches of `--micro` sequences.
Prints a table; writes train.json under $OUT (or --out).

Variants: full (AC on, gradients reduced at the last micro-batch, as grpo.loop does), full-rs (reduce-scatter after
every micro-batch), full-optoff (AdamW state on the host between steps), full-paramoff (FSDP2 CPUOffloadPolicy:
shards, gradients and AdamW on the host), lora (r=32, alpha=32, all-linear), full-noac (no activation checkpointing).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import socket
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import DeviceMesh

from grpo.bench.assets import SHAPES, write_random_checkpoint

VARIANTS = {
    "full": dict(activation_checkpointing=True),
    "full-rs": dict(activation_checkpointing=True),
    "full-noac": dict(activation_checkpointing=False),
    "full-optoff": dict(activation_checkpointing=True, optimizer_offload=True),
    "full-paramoff": dict(activation_checkpointing=True, param_offload=True, optimizer_offload=True),
    "lora": dict(activation_checkpointing=True, lora_rank=32, lora_alpha=32, lora_targets="all-linear"),
}
GB = 1 << 30


def make_batch(args, rank: int, world: int, vocab: int, device: torch.device):
    rows = args.seqs // world
    g = torch.Generator(device="cpu").manual_seed(100 + rank)
    length = args.prompt + args.response
    ids = torch.randint(0, vocab, (rows, length), generator=g)
    attn = torch.ones_like(ids)
    loss_mask = torch.zeros(rows, length - 1)
    loss_mask[:, args.prompt - 1:] = 1.0  # position t predicts token t+1: the response tokens
    adv = torch.randn(rows, generator=g)
    return [x.to(device) for x in (ids, attn, loss_mask, adv)]


def run_variant(name: str, args, ckpt: Path, device: torch.device, group) -> dict:
    from grpo.config import ModelConfig
    from grpo.loss import agg_loss, kl_penalty, policy_loss
    from grpo.policy import build_optimizer, build_policy, build_reference

    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = ModelConfig(path=str(ckpt), dtype="bfloat16", **VARIANTS[name])
    mesh = DeviceMesh.from_group(group, device_type=device.type)
    cuda = device.type == "cuda"
    sync = lambda: (cuda and torch.cuda.synchronize(), dist.barrier(group=group))
    gc.collect()  # FSDP2 modules sit in reference cycles: the previous variant is freed only by the collector
    if cuda:
        torch.cuda.empty_cache()
    baseline = torch.cuda.memory_allocated() if cuda else 0
    sync()
    t0 = time.perf_counter()
    policy = build_policy(cfg, mesh, seed=0, trainable=True, device=device)
    reference = build_reference(cfg, policy, mesh, seed=0, device=device)
    sync()
    load_s = time.perf_counter() - t0
    opt = build_optimizer(policy, cfg, lr=1e-6, weight_decay=0.0)
    resident = (torch.cuda.memory_allocated() - baseline) / GB if cuda else 0.0
    ids, attn, loss_mask, adv = make_batch(args, rank, world, policy.lm.config.vocab_size, device)
    rows = ids.shape[0]
    slices = [slice(i, min(i + args.micro, rows)) for i in range(0, rows, args.micro)]
    every_micro = name == "full-rs"

    def logprobs(model):
        out = torch.zeros_like(loss_mask)
        with torch.no_grad():
            for sl in slices:
                out[sl] = model(ids[sl], attn[sl], loss_mask[sl])[0]
        return out

    steps = []
    for step in range(args.steps):
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        sync()
        t0 = time.perf_counter()
        old = logprobs(policy)
        sync()
        t1 = time.perf_counter()
        ref = logprobs(reference)
        sync()
        t2 = time.perf_counter()
        num_tokens = loss_mask.sum()
        dist.all_reduce(num_tokens, group=group)
        for j, sl in enumerate(slices):
            policy.set_requires_gradient_sync(every_micro or j == len(slices) - 1)
            logp, _ = policy(ids[sl], attn[sl], loss_mask[sl])
            pg, _ = policy_loss(logp, old[sl], adv[sl], loss_mask[sl], num_tokens=num_tokens)
            kl = agg_loss(kl_penalty(logp, ref[sl], "low_var_kl"), loss_mask[sl], "token-mean",
                          num_tokens=num_tokens)
            ((pg + 0.001 * kl) * world).backward()
        norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        t3 = time.perf_counter()
        tokens = ids.numel()
        steps.append({"step": step + 1, "old_s": t1 - t0, "ref_s": t2 - t1, "update_s": t3 - t2,
                      "step_s": t3 - t0, "update_tok_s_gpu": tokens / (t3 - t2), "step_tok_s_gpu": tokens / (t3 - t0),
                      "grad_norm": float(norm.detach()), "kl": float(kl.detach()),
                      "peak_alloc_gb": torch.cuda.max_memory_allocated() / GB if cuda else 0.0,
                      "peak_reserved_gb": torch.cuda.max_memory_reserved() / GB if cuda else 0.0})
    per_rank = [None] * world
    dist.all_gather_object(per_rank, {"steps": steps, "load_s": load_s, "resident_gb": resident}, group=group)
    return {"variant": name, "config": VARIANTS[name], "ranks": per_rank}


def worker(rank: int, world: int, port: int, args) -> None:
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # gloo for host tensors: with param offload the grad-norm all-reduce runs on CPU DTensors
    dist.init_process_group("cpu:gloo,cuda:nccl", rank=rank, world_size=world, device_id=device)
    group = dist.group.WORLD
    ckpt = Path(args.ckpt or f"/tmp/grpo-bench-{args.shapes}")
    write_s = 0.0
    if rank == 0 and not (ckpt / "model.safetensors.index.json").is_file():
        write_s = write_random_checkpoint(ckpt, args.shapes, device=device)
    dist.barrier()
    results = []
    for name in args.variants.split(","):
        try:
            results.append(run_variant(name, args, ckpt, device, group))
        except torch.OutOfMemoryError as e:
            results.append({"variant": name, "error": f"OOM: {str(e).splitlines()[0]}"})
            gc.collect()
            torch.cuda.empty_cache()
        if rank == 0:
            report(results[-1], args)
    if rank == 0:
        meta = {"date": datetime.date.today().isoformat(), "card": torch.cuda.get_device_name(),
                "gpus": world, "torch": torch.__version__, "shapes": args.shapes, "seqs": args.seqs,
                "prompt": args.prompt, "response": args.response, "micro": args.micro,
                "checkpoint_write_s": write_s}
        out = Path(args.out or os.environ.get("OUT", "."))
        out.mkdir(parents=True, exist_ok=True)
        (out / "train.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
        print(json.dumps(meta))
    dist.destroy_process_group()


def report(result: dict, args) -> None:
    if "error" in result:
        print(f"{result['variant']:<14} {result['error']}", flush=True)
        return
    ranks = result["ranks"]
    timed = ranks[0]["steps"][1:] or ranks[0]["steps"]  # the first step includes warm-up
    med = lambda k: statistics.median(s[k] for s in timed)
    peak_a = max(s["peak_alloc_gb"] for r in ranks for s in r["steps"])
    peak_r = max(s["peak_reserved_gb"] for r in ranks for s in r["steps"])
    print(f"{result['variant']:<14} load {ranks[0]['load_s']:5.1f}s  resident {ranks[0]['resident_gb']:5.2f} GB  "
          f"old {med('old_s'):5.2f}s  ref {med('ref_s'):5.2f}s  update {med('update_s'):5.2f}s  "
          f"step {med('step_s'):5.2f}s  update {med('update_tok_s_gpu'):7.0f} tok/s/GPU  "
          f"step {med('step_tok_s_gpu'):7.0f} tok/s/GPU  peak alloc {peak_a:5.2f} GB reserved {peak_r:5.2f} GB",
          flush=True)
    for r, rk in enumerate(ranks):
        for s in rk["steps"]:
            print(f"    rank {r} step {s['step']}: old {s['old_s']:.3f}s ref {s['ref_s']:.3f}s "
                  f"update {s['update_s']:.3f}s peak {s['peak_alloc_gb']:.2f}/{s['peak_reserved_gb']:.2f} GB "
                  f"grad_norm {s['grad_norm']:.3g} kl {s['kl']:.3g}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--shapes", choices=sorted(SHAPES), default="qwen2.5-1.5b")
    p.add_argument("--variants", default="full,lora")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--seqs", type=int, default=64)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--response", type=int, default=512)
    p.add_argument("--micro", type=int, default=8)
    p.add_argument("--ckpt", default="", help="checkpoint folder (default /tmp/grpo-bench-SHAPES; written if absent)")
    p.add_argument("--out", default="")
    args = p.parse_args()
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; valid: {', '.join(VARIANTS)}")
    if not torch.cuda.is_available() or torch.cuda.device_count() < args.gpus:
        p.error(f"needs {args.gpus} CUDA GPUs, found {torch.cuda.device_count() if torch.cuda.is_available() else 0}")
    if args.seqs % args.gpus:
        p.error(f"--seqs {args.seqs} must divide by --gpus {args.gpus}")
    mp.spawn(worker, args=(args.gpus, free_port(), args), nprocs=args.gpus, join=True)


if __name__ == "__main__":
    main()
