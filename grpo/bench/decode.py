"""Benchmark: the native engine's decode step against the HBM roofline, with the kernels that take its time.

    python -m grpo.bench.decode [--shapes qwen2.5-1.5b] [--batch 64] [--prompt-len 128] [--new 512] [--profile]

Random weights of the chosen shapes (bf16), `--batch` rows of `--prompt-len` tokens, `--new` tokens forced (EOS never
matches). Reports the median over `--repeats` generations of the whole generate call and of one decode step
(from a 1-token and an `--new`-token generation), the bytes one decode step must read (weights + the mean KV cache
it attends over) and the roofline time at the card's bandwidth (`--hbm-gbps`, default the H200's 4,800 GB/s), and
with `--profile` the top CUDA kernels of 16 decode steps (torch.profiler). Writes decode.json under $OUT.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from grpo.bench.assets import SHAPES
from grpo.rollout import NativeEngine


def build(shapes: str, device: torch.device, dtype: torch.dtype):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        lm = Qwen2ForCausalLM(Qwen2Config(**SHAPES[shapes], attn_implementation="sdpa"))
    return lm.to(dtype).eval()


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", choices=sorted(SHAPES), default="qwen2.5-1.5b")
    ap.add_argument("--batch", type=int, default=64, help="rows decoded together (prompts x samples)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hbm-gbps", type=float, default=4800.0)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", ""))
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    lm = build(args.shapes, device, dtype)
    cfg = lm.config
    prompts = torch.randint(3, cfg.vocab_size, (args.batch, args.prompt_len)).tolist()
    eng = NativeEngine(lm, pad_id=0, eos_id=-1, max_new_tokens=args.new)
    eng.generate(prompts, n=1, seed=0)  # compile, capture
    whole = [timed(lambda: eng.generate(prompts, n=1, seed=0), device) for _ in range(args.repeats)]
    eng.max_new_tokens = 1
    eng.generate(prompts, n=1, seed=0)
    one = [timed(lambda: eng.generate(prompts, n=1, seed=0), device) for _ in range(args.repeats)]
    step_s = (statistics.median(whole) - statistics.median(one)) / (args.new - 1)
    # every weight is read once a step; an untied input embedding only for the rows looked up
    weight_bytes = sum(p.numel() * p.element_size() for p in lm.parameters())
    if not cfg.tie_word_embeddings:
        weight_bytes -= lm.model.embed_tokens.weight.numel() * lm.model.embed_tokens.weight.element_size()
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * torch.finfo(dtype).bits // 8
    mean_len = args.prompt_len + args.new / 2
    step_bytes = weight_bytes + kv_per_token * mean_len * args.batch
    out = {"shapes": args.shapes, "batch": args.batch, "prompt_len": args.prompt_len, "new": args.new,
           "generate_s": statistics.median(whole), "generate_s_all": whole, "decode_step_ms": step_s * 1e3,
           "step_bytes_gb": step_bytes / 1e9, "roofline_step_ms": step_bytes / (args.hbm_gbps * 1e9) * 1e3,
           "achieved_gbps": step_bytes / step_s / 1e9, "tok_s": args.batch * args.new / statistics.median(whole)}
    if device.type == "cuda":
        out["card"] = torch.cuda.get_device_name(0)
    print(json.dumps(out, indent=1))
    if args.profile and device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        eng.max_new_tokens = 17
        eng.generate(prompts, n=1, seed=0)
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            eng.generate(prompts, n=1, seed=0)
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
        print(table)
        out["profile"] = table
    if args.out:
        Path(args.out, "decode.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
