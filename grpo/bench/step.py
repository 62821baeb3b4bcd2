"""Benchmark: one GRPO step on one GPU from our pieces, against TRL's GRPOTrainer baseline (same shapes).

    python -m grpo.bench.step [--tiny] [--prompts 8] [--n 8] [--prompt-len 128] [--new 512] [--steps 2]

Random-init Qwen2.5-1.5B shapes, bf16. Per step: the native engine samples n responses for each prompt (EOS never
matches, so every response has exactly --new tokens, as TRL's min_new_tokens forces), random rewards and group
advantages, old and reference log-probs (no grad), then per micro-batch the policy forward/backward (grpo.policy's
FSDP2 policy over a one-rank mesh, grpo.loss: clipped surrogate + low_var_kl), one AdamW step, and the weight sync to
the engine (in-process: load_weights of the policy's full tensors). Reports generated tokens/s of generation alone and
of the whole step, the decode step in ms with and without CUDA graphs, and the split. Writes step.json under $OUT.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import time

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from grpo_kernels import group_advantage_ref
from grpo.loss import agg_loss, kl_penalty, policy_loss
from grpo.policy import CausalLMPolicy, apply_fsdp, hf_named_parameters
from grpo.rollout import NativeEngine

QWEN25_1P5B = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                   num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True,
                   max_position_embeddings=32768, rope_theta=1e6)
TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=512)

TRL_H100 = {"step_s": 19.22, "gen_tok_s_step": 1704.7, "gen_tok_s_generate": 1858.0}  # trl-grpo-baseline-h100.json


def build_lm(shapes: dict, device: torch.device, dtype: torch.dtype, seed: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        lm = Qwen2ForCausalLM(Qwen2Config(**shapes, attn_implementation="sdpa"))
    return lm.to(dtype)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes, for a CPU smoke run")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new", type=int, default=512)
    ap.add_argument("--micro", type=int, default=8, help="sequences per micro-batch (forward/backward)")
    ap.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    ap.add_argument("--out", default=os.environ.get("OUT", ""))
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    shapes = TINY if args.tiny else QWEN25_1P5B
    vocab = shapes["vocab_size"]

    engine_lm = build_lm(shapes, device, torch.bfloat16, seed=0)
    engine = NativeEngine(engine_lm, pad_id=0, eos_id=-1, max_new_tokens=args.new, temperature=1.0)
    policy = CausalLMPolicy(build_lm(shapes, device, torch.float32, seed=0))  # float32 master weights
    apply_fsdp(policy, DeviceMesh.from_group(dist.group.WORLD, device_type=device.type), param_dtype=torch.bfloat16)
    ref = CausalLMPolicy(build_lm(shapes, device, torch.bfloat16, seed=0)).requires_grad_(False).eval()
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-6)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for step in range(args.steps + 1):
        prompts = torch.randint(3, vocab, (args.prompts, args.prompt_len), generator=gen).tolist()
        sync(device)
        t0 = time.perf_counter()
        out = engine.generate(prompts, n=args.n, seed=step)
        sync(device)
        t1 = time.perf_counter()
        stats = update(policy, ref, opt, prompts, out, args, device)
        sync(device)
        t2 = time.perf_counter()
        with torch.no_grad():
            engine.load_weights((name, p.full_tensor()) for name, p in hf_named_parameters(policy))
        sync(device)
        t3 = time.perf_counter()
        tokens = sum(len(c.token_ids) for g in out for c in g)
        rows.append({"step": step, "gen_s": t1 - t0, "update_s": t2 - t1, "sync_s": t3 - t2, "step_s": t3 - t0,
                     "tokens": tokens, **stats})
        print(f"step {step}{' (warm-up)' if step == 0 else ''}: generate {t1 - t0:.2f} s ({tokens / (t1 - t0):,.0f} "
              f"tok/s), update {t2 - t1:.2f} s, sync {t3 - t2:.3f} s, step {t3 - t0:.2f} s "
              f"({tokens / (t3 - t0):,.0f} tok/s)", flush=True)
    timed_rows = rows[1:] or rows
    med = lambda k: sorted(r[k] for r in timed_rows)[len(timed_rows) // 2]  # noqa: E731
    tokens = timed_rows[0]["tokens"]
    decode = decode_ms(engine_lm, args, vocab, device)
    summary = {
        "card": torch.cuda.get_device_name(device) if cuda else "cpu", "torch": torch.__version__,
        "shapes": "tiny" if args.tiny else "qwen2.5-1.5b", "prompts": args.prompts, "n": args.n,
        "prompt_len": args.prompt_len, "new_tokens": args.new, "micro": args.micro,
        "gen_s": med("gen_s"), "update_s": med("update_s"), "sync_s": med("sync_s"), "step_s": med("step_s"),
        "gen_tok_s": tokens / med("gen_s"), "step_tok_s": tokens / med("step_s"), "decode_ms": decode,
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None, "rows": rows,
        "trl_h100": TRL_H100,
    }
    print(f"\n{summary['card']}, {summary['shapes']}, {args.prompts} prompts x {args.n} samples, "
          f"{args.prompt_len}-token prompts, {args.new} new tokens")
    print(f"{'':<22}{'ours':>10}{'TRL (H100)':>12}{'x':>7}")
    print(f"{'generation tok/s':<22}{summary['gen_tok_s']:>10,.0f}{TRL_H100['gen_tok_s_generate']:>12,.0f}"
          f"{summary['gen_tok_s'] / TRL_H100['gen_tok_s_generate']:>7.1f}")
    print(f"{'whole step tok/s':<22}{summary['step_tok_s']:>10,.0f}{TRL_H100['gen_tok_s_step']:>12,.0f}"
          f"{summary['step_tok_s'] / TRL_H100['gen_tok_s_step']:>7.1f}")
    print(f"{'step s':<22}{summary['step_s']:>10.2f}{TRL_H100['step_s']:>12.2f}")
    print(f"decode step ms: {decode}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "step.json"), "w") as f:
            json.dump(summary, f, indent=1)
    dist.destroy_process_group()


def update(policy, ref, opt, prompts, out, args, device) -> dict:
    """Old/ref log-probs, then clipped surrogate + k3 KL per micro-batch, backward, clip, one optimizer step."""
    seqs = [p + c.token_ids for p, g in zip(prompts, out) for c in g]
    ids = torch.tensor(seqs, device=device)  # every row has the same length (forced full-length responses)
    attn = torch.ones_like(ids)
    mask = torch.zeros(ids.shape[0], ids.shape[1] - 1, device=device)
    mask[:, args.prompt_len - 1:] = 1.0
    rewards = torch.rand(ids.shape[0], generator=torch.Generator().manual_seed(1)).round()
    adv = group_advantage_ref(rewards, args.n).to(device)
    mb = args.micro
    with torch.no_grad():
        old = torch.cat([policy(ids[i:i + mb], attn[i:i + mb], mask[i:i + mb])[0] for i in range(0, len(ids), mb)])
        ref_lp = torch.cat([ref(ids[i:i + mb], attn[i:i + mb], mask[i:i + mb])[0] for i in range(0, len(ids), mb)])
    num_tokens = mask.sum()
    for i in range(0, len(ids), mb):
        m = mask[i:i + mb]
        logp, _ = policy(ids[i:i + mb], attn[i:i + mb], m)
        pg, _ = policy_loss(logp, old[i:i + mb], adv[i:i + mb], m, num_tokens=num_tokens)
        kl = agg_loss(kl_penalty(logp, ref_lp[i:i + mb], "low_var_kl"), m, "token-mean", num_tokens=num_tokens)
        (pg + 0.04 * kl).backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    return {"grad_norm": float(grad_norm)}


def decode_ms(lm, args, vocab: int, device) -> dict:
    """Milliseconds per decode step (batch prompts x n) with and without CUDA graphs, 32 tokens each."""
    out = {}
    prompts = torch.randint(3, vocab, (args.prompts, args.prompt_len)).tolist()
    for graphs in ([True, False] if device.type == "cuda" else [False]):
        eng = NativeEngine(lm, pad_id=0, eos_id=-1, max_new_tokens=33, cuda_graphs=graphs)
        eng.generate(prompts, n=args.n, seed=0)
        times = []
        for new in (1, 33):
            eng.max_new_tokens = new
            sync(device)
            t = time.perf_counter()
            eng.generate(prompts, n=args.n, seed=0)
            sync(device)
            times.append(time.perf_counter() - t)
        out["graphs" if graphs else "eager"] = (times[1] - times[0]) / 32 * 1e3
    return out


if __name__ == "__main__":
    main()
