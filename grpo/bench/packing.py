"""Benchmark: the trainer's step with packed micro-batches against padded ones, in one run on one GPU.

    python -m grpo.bench.packing [--tiny] [--variants full,lora] [--modes padded,packed,packed-sdpa]
                                 [--seqs 64] [--prompt 128] [--response 32-512] [--max-tokens 16384] [--steps 4]

Random Qwen2.5-1.5B weights written as a Hugging Face folder and loaded by `build_policy` (FSDP2 over a one-rank
mesh, bf16 compute, activation checkpointing; full fine-tuning keeps a frozen bf16 reference, LoRA r=32 uses the
adapters-off model). The batch is what the coordinator makes: `--seqs` responses of lengths drawn uniformly from
`--response` after `--prompt`-token prompts (right-padded rows), random advantages. Per step and mode, all through
grpo.train_step as the loop runs it:
- old: the old log-prob pass (`logprobs` of the policy; runs when a batch takes several optimizer steps),
- step: `train_step` with one mini-batch (reference pass + update: forward, fused GRPO loss, backward, AdamW),
- update = step - ref, where ref is the reference pass timed alone just before.
Modes: `padded` (train.pack=false: the budget counts rows x longest row, SDPA with a padding mask), `packed`
(train.pack=true, the product's attention choice: torch's varlen flash kernel on a GPU), `packed-gqa-repeat` (the
same with the KV heads repeated to the query heads before the kernel), `packed-sdpa` (packed,
transformers' dense block-diagonal mask), `packed-flex` (packed, transformers' flex_attention; compiles).
The modes run in turn inside each step, so they see the same clocks. Step 1 is warm-up; figures are medians of the
rest. Also checks the log-probs: each packed mode against padded, same weights, before any update.
Writes packing.json under $OUT (or --out). --tiny: tiny shapes on the CPU (float32), a smoke run.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from grpo import packing
from grpo.batch import make_batch
from grpo.bench.assets import write_random_checkpoint
from grpo.config import AlgoConfig, Config, ModelConfig, RolloutConfig, TrainConfig
from grpo.rollout import Completion
from grpo.train_step import Models, Ranks, logprobs, micro_batches, train_step

MODES = {"padded": (False, "auto", "native"), "packed": (True, "auto", "native"),
         "packed-gqa-repeat": (True, "auto", "repeat"), "packed-sdpa": (True, "sdpa", "native"),
         "packed-flex": (True, "flex_attention", "native")}
LORA = dict(lora_rank=32, lora_alpha=32, lora_targets="all-linear")
GB = 1 << 30


def random_batch(args, vocab: int):
    """`--seqs` rows: one prompt per row (lengths fixed), responses of uniform random lengths."""
    g = torch.Generator().manual_seed(0)
    lo, hi = args.response
    prompts, groups = [], []
    for _ in range(args.seqs):
        prompts.append(torch.randint(2, vocab, (args.prompt,), generator=g).tolist())
        n = int(torch.randint(lo, hi + 1, (), generator=g))
        groups.append([Completion(torch.randint(2, vocab, (n,), generator=g).tolist(), [-1.0] * n, "length")])
    return make_batch(prompts, groups, torch.randn(args.seqs, generator=g), pad_id=0)


def config(args, *, pack: bool) -> Config:
    return Config(rollout=RolloutConfig(max_new_tokens=args.response[1], temperature=1.0),
                  algo=AlgoConfig(kl_coef=0.001, kl_kind="low_var_kl", agg="token-mean"),
                  train=TrainConfig(lr=1e-6, mini_batches=1, max_tokens_per_gpu=args.max_tokens, pack=pack))


def use(mode: str) -> None:
    """The packed path's attention kernel and GQA handling for `mode` (grpo.packing's switches)."""
    packing.ATTENTION, packing.GQA = MODES[mode][1:]


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_variant(name: str, args, ckpt: Path, device: torch.device) -> dict:
    from grpo.policy import build_optimizer, build_policy, build_reference

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    extra = LORA if name == "lora" else {}
    model_cfg = ModelConfig(path=str(ckpt), dtype=args.dtype, activation_checkpointing=True, **extra)
    mesh = DeviceMesh.from_group(dist.group.WORLD, device_type=device.type)
    policy = build_policy(model_cfg, mesh, seed=0, trainable=True, device=device)
    ref = build_reference(model_cfg, policy, mesh, seed=0, device=device)
    opt = build_optimizer(policy, model_cfg, lr=1e-6, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    models = Models(policy, ref, opt, sched, fused=policy.fused_loss_available(device))
    batch = random_batch(args, policy.lm.config.vocab_size).to(device)
    lengths = batch.attention_mask.sum(1).tolist()
    real = sum(lengths)
    shape = {}
    for mode in args.modes:
        groups = micro_batches(batch, config(args, pack=MODES[mode][0]), Ranks())
        shape[mode] = {"micro_batches": len(groups),
                       "computed_tokens": sum(len(g) * max(lengths[i] for i in g.tolist()) if not MODES[mode][0]
                                              else sum(lengths[i] for i in g.tolist()) for g in groups if len(g))}
    # correctness at equal weights, before any update: every mode's old log-probs against the first mode's
    ref_logp, check, errors = None, {}, {}
    for mode in args.modes:
        use(mode)
        try:
            logp = logprobs(policy, batch, config(args, pack=MODES[mode][0]), Ranks())
        except Exception as e:  # a mode this machine cannot run (e.g. a kernel missing) is reported, not fatal
            errors[mode] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            continue
        if ref_logp is None:
            ref_logp = logp
        diff = ((logp - ref_logp).abs() * batch.loss_mask)
        check[mode] = {"logp_maxdiff_vs_" + args.modes[0]: float(diff.max()),
                       "logp_meandiff_vs_" + args.modes[0]: float(diff.sum() / batch.loss_mask.sum())}
    modes = [m for m in args.modes if m not in errors]
    steps = {mode: [] for mode in modes}
    for step in range(args.steps):
        for mode in list(modes):
            cfg = config(args, pack=MODES[mode][0])
            use(mode)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            try:
                _, old_s = timed(lambda: logprobs(policy, batch, cfg, Ranks()), device)
                _, ref_s = timed(lambda: logprobs(ref, batch, cfg, Ranks()), device)
                metrics, step_s = timed(lambda: train_step(models, batch, cfg, Ranks()), device)
            except Exception as e:
                errors[mode] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                modes.remove(mode)
                models.opt.zero_grad(set_to_none=True)
                continue
            steps[mode].append({"step": step + 1, "old_s": old_s, "ref_s": ref_s, "step_s": step_s,
                                "update_s": step_s - ref_s, "grad_norm": float(metrics["grad_norm"]),
                                "peak_alloc_gb": torch.cuda.max_memory_allocated() / GB if device.type == "cuda"
                                else 0.0})
    use("packed")
    result = {"variant": name, "real_tokens": real, "response_tokens": int(batch.loss_mask.sum()), "modes": {},
              "errors": errors}
    for mode in modes:
        timed_steps = steps[mode][1:] or steps[mode]
        med = {k: statistics.median(s[k] for s in timed_steps) for k in ("old_s", "ref_s", "step_s", "update_s")}
        result["modes"][mode] = {
            **shape[mode], **check[mode], **med,
            "update_tok_s": real / med["update_s"], "trainer_step_s": med["old_s"] + med["step_s"],
            "peak_alloc_gb": max(s["peak_alloc_gb"] for s in steps[mode]), "steps": steps[mode]}
    base = result["modes"][args.modes[0]]
    for mode, r in result["modes"].items():
        r["update_speedup"] = base["update_s"] / r["update_s"]
        r["step_speedup"] = base["step_s"] / r["step_s"]
        r["trainer_step_speedup"] = base["trainer_step_s"] / r["trainer_step_s"]
    return result


def report(result: dict) -> None:
    print(f"\n{result['variant']}: {result['real_tokens']} real tokens ({result['response_tokens']} response tokens)")
    print(f"{'mode':<17} {'micro':>5} {'computed tok':>12} {'old s':>7} {'ref s':>7} {'update s':>8} "
          f"{'step s':>7} {'old+step s':>10} {'update tok/s':>12} {'x update':>8} {'x old+step':>10} "
          f"{'peak GiB':>8} {'max |dlogp|':>11}")
    for mode, r in result["modes"].items():
        diff = next(v for k, v in r.items() if k.startswith("logp_maxdiff"))
        print(f"{mode:<17} {r['micro_batches']:>5} {r['computed_tokens']:>12} {r['old_s']:>7.3f} {r['ref_s']:>7.3f} "
              f"{r['update_s']:>8.3f} {r['step_s']:>7.3f} {r['trainer_step_s']:>10.3f} {r['update_tok_s']:>12.0f} "
              f"{r['update_speedup']:>8.2f} {r['trainer_step_speedup']:>10.2f} {r['peak_alloc_gb']:>8.2f} "
              f"{diff:>11.2e}", flush=True)
    for mode, error in result["errors"].items():
        print(f"{mode:<17} {error}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU, float32: a smoke run")
    p.add_argument("--variants", default="full,lora")
    p.add_argument("--modes", default="padded,packed,packed-sdpa",
                   help=f"comma-separated, the first is the baseline; from {', '.join(MODES)}")
    p.add_argument("--seqs", type=int, default=64)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--response", default="32-512", help="response lengths, uniform in LO-HI")
    p.add_argument("--max-tokens", type=int, default=16384, help="train.max_tokens_per_gpu (the 1-GPU preset's)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--ckpt", default="", help="checkpoint folder (default /tmp/grpo-bench-SHAPES; written if absent)")
    p.add_argument("--out", default="")
    args = p.parse_args()
    args.modes = args.modes.split(",")
    unknown = [m for m in args.modes if m not in MODES]
    if unknown:
        p.error(f"unknown mode(s) {unknown}; valid: {', '.join(MODES)}")
    args.response = tuple(int(x) for x in args.response.split("-"))
    cuda = torch.cuda.is_available() and not args.tiny
    if not cuda and not args.tiny:
        p.error("no CUDA GPU: run with --tiny for a CPU smoke run")
    if args.tiny:
        args.seqs, args.prompt, args.steps = min(args.seqs, 12), min(args.prompt, 8), min(args.steps, 2)
        args.response = (min(args.response[0], 4), min(args.response[1], 48))
        args.max_tokens = min(args.max_tokens, 160)
    shapes = "tiny" if args.tiny else "qwen2.5-1.5b"
    args.dtype = "float32" if args.tiny else "bfloat16"
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", store=dist.HashStore(), rank=0,
                            world_size=1, **({"device_id": device} if cuda else {}))
    ckpt = Path(args.ckpt or f"/tmp/grpo-bench-{shapes}")
    if not (ckpt / "model.safetensors.index.json").is_file():
        write_random_checkpoint(ckpt, shapes, device=device)
    results = []
    for name in args.variants.split(","):
        try:
            results.append(run_variant(name, args, ckpt, device))
            report(results[-1])
        except torch.OutOfMemoryError as e:
            results.append({"variant": name, "error": f"OOM: {str(e).splitlines()[0]}"})
            print(f"{name}: {results[-1]['error']}", flush=True)
    meta = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name() if cuda else "cpu",
            "torch": torch.__version__, "varlen_attn": packing._varlen_attn is not None, "shapes": shapes,
            "seqs": args.seqs, "prompt": args.prompt, "response": list(args.response),
            "max_tokens_per_gpu": args.max_tokens, "steps": args.steps, "dtype": args.dtype}
    import transformers
    meta["transformers"] = transformers.__version__
    out = Path(args.out or os.environ.get("OUT", "."))
    out.mkdir(parents=True, exist_ok=True)
    (out / "packing.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(json.dumps(meta))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
