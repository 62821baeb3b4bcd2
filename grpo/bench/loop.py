"""Benchmark: whole GRPO steps of the real loop (`python -m hpc.submit`), beside TRL's GRPOTrainer on the same card.

    python -m grpo.bench.loop [--preset h100x1] [--shapes qwen2.5-1.5b] [--steps 4] [--trl trl_baseline.json]

Writes a random checkpoint of the chosen shapes with a word-level tokenizer and a prompt file of exact lengths
(grpo.bench.assets), then runs the preset through hpc.submit with TRL's baseline shapes: `--prompts` prompts x `--n`
samples, `--prompt-len`-token prompts, `--new` new tokens forced (rollout.ignore_eos). `--eos-boost B` lets
responses end instead: the checkpoint's EOS logit is raised by about B at every position (grpo.bench.assets), so
lengths are geometric and capped by `--new` (on an H200, B = 12 on the 1.5B shapes gave means of 226-292 of 512,
from 1 to 512: the spread of a real GRPO batch; the rise is weaker in the GPU engine's bf16 decode than a CPU
float32 forward suggests); generated tokens are then counted, not assumed. Everything else is the
preset's (h100x1: trainer and native engine processes sharing one GPU, FSDP2 policy with float32 master weights,
activation checkpointing, frozen reference, KL 0.04, the Triton kernels). Reports the median over the steps after the
first (warm-up: CUDA graphs, Triton compiles) of the step time and its split, generated tokens/s, and each process's
peak GPU memory, beside TRL's figures from `--trl` (the JSON written by the TRL baseline script). Writes loop.json
under $OUT (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from grpo.bench.assets import SHAPES, write_model_folder, write_prompts

SPLIT = ("generate_s", "rollout_s", "update_s", "sync_s")


def prepare(work: Path, args) -> tuple[Path, Path]:
    model = work / (f"model-{args.shapes}" + (f"-eos{args.eos_boost:g}" if args.eos_boost else ""))
    if not (model / "tokenizer.json").is_file():
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        took = write_model_folder(model, args.shapes, device=device, eos_boost=args.eos_boost)
        print(f"wrote a random {args.shapes} checkpoint to {model} ({took:.1f} s)")
    prompts = work / f"prompts-{args.prompt_len}.jsonl"
    write_prompts(prompts, num=max(64, 4 * args.prompts), length=args.prompt_len,
                  vocab_size=SHAPES[args.shapes]["vocab_size"])
    return model, prompts


def run_loop(model: Path, prompts: Path, work: Path, args) -> tuple[Path, float]:
    sets = {"model.path": model, "model.arch": "", "data.task": "dataset", "data.train_path": prompts,
            "data.prompts_per_step": args.prompts, "data.max_prompt_len": args.prompt_len, "rollout.n": args.n,
            "rollout.max_new_tokens": args.new, "rollout.ignore_eos": str(not args.eos_boost).lower(),
            "train.steps": args.steps,
            "train.export_hf": "false", "job.executor": "local", "out_dir": work / "runs"}
    cmd = [sys.executable, "-m", "hpc.submit", "--preset", args.preset]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={value}"]
    for extra in args.set:
        cmd += ["--set", extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    print(proc.stdout[-4000:], proc.stderr[-4000:], sep="\n")
    if proc.returncode != 0:
        raise SystemExit(f"the run failed (exit {proc.returncode})")
    return Path(re.search(r"^run folder: (.+)$", proc.stdout, re.M).group(1)), wall


def summarise(run_dir: Path, args, wall: float) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = rows[1:] or rows
    median = lambda key: statistics.median(r[key] for r in timed) if key in timed[0] else None  # noqa: E731
    tokens = args.prompts * args.n * (median("response_len") if args.eos_boost else args.new)
    step = median("step_s")
    out = {"preset": args.preset, "shapes": args.shapes, "prompts": args.prompts, "n": args.n,
           "prompt_len": args.prompt_len, "new_tokens": args.new, "steps": len(rows), "timed_steps": len(timed),
           "wall_s": wall, "step_s": step, "step_s_all": [r["step_s"] for r in rows],
           **{key: median(key) for key in SPLIT}, "gen_tok_s_step": tokens / step,
           "response_len": median("response_len"), "response_len_all": [r["response_len"] for r in rows],
           "response_len_min": min(r.get("response_len_min", 0) for r in rows),
           "response_len_max": max(r.get("response_len_max", 0) for r in rows),
           "trainer_gpu_peak_gib": max((r.get("trainer_gpu_peak_gib", 0) for r in rows), default=0),
           "engine_gpu_peak_gib": max((r.get("engine_peak_gib", 0) for r in rows), default=0),
           "trainer_gpu_peak_alloc_gib": max((r.get("trainer_gpu_peak_alloc_gib", 0) for r in rows), default=0)}
    if out["generate_s"]:
        out["gen_tok_s_generate"] = tokens / out["generate_s"]
    if torch.cuda.is_available():
        out["card"] = torch.cuda.get_device_name(0)
    return out


def report(ours: dict, trl: dict | None) -> None:
    print(f"\n{ours['preset']} ({ours.get('card', 'cpu')}), {ours['shapes']}, {ours['prompts']} x {ours['n']} "
          f"samples, {ours['prompt_len']} + {ours['new_tokens']} tokens (mean response {ours['response_len']:.0f}), "
          f"median of {ours['timed_steps']} steps")
    rows = [("step s", ours["step_s"], trl and trl.get("step_seconds_median")),
            ("generated tok/s, whole step", ours["gen_tok_s_step"], trl and trl.get("tokens_per_s_step")),
            ("generation s", ours["generate_s"], trl and trl.get("generate_s")),
            ("update s (old/ref log-probs, loss, backward, AdamW)", ours["update_s"], None),
            ("weight sync s", ours["sync_s"], None),
            ("peak GiB reserved: trainer / engine", f"{ours['trainer_gpu_peak_gib']:.1f} / "
             f"{ours['engine_gpu_peak_gib']:.1f}", None),
            ("peak GiB allocated: trainer", f"{ours['trainer_gpu_peak_alloc_gib']:.1f}",
             trl and trl.get("peak_gib"))]
    for name, a, b in rows:
        fa = a if isinstance(a, str) else f"{a:,.2f}" if a is not None else "-"
        fb = b if isinstance(b, str) else f"{b:,.2f}" if b is not None else "-"
        print(f"  {name:<52} {fa:>14} {fb:>14}")
    if trl and trl.get("tokens_per_s_step"):
        print(f"  whole step: {ours['gen_tok_s_step'] / trl['tokens_per_s_step']:.2f}x TRL's generated tokens/s")


def trl_figures(path: str | None) -> dict | None:
    """The numbers compared, from the JSON the TRL baseline script writes."""
    if not path or not Path(path).is_file():
        return None
    data = json.loads(Path(path).read_text())
    split = data.get("time_split_median_s", {})
    return {"card": data.get("card"), "step_seconds_median": data["step_seconds_median"],
            "tokens_per_s_step": data["generated_tokens_per_s"], "peak_gib": data.get("peak_gpu_alloc_gib"),
            "generate_s": next((v for k, v in split.items() if "generate" in k), None)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="h100x1")
    ap.add_argument("--shapes", choices=sorted(SHAPES), default="qwen2.5-1.5b")
    ap.add_argument("--steps", type=int, default=4, help="steps; the first is warm-up")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new", type=int, default=512)
    ap.add_argument("--eos-boost", type=float, default=0.0, help="let responses end at random lengths (see above)")
    ap.add_argument("--set", action="append", default=[], help="more KEY=VALUE overrides for the preset")
    ap.add_argument("--work", default="/tmp/grpo-bench-loop")
    ap.add_argument("--trl", default=None, help="TRL baseline JSON to compare with (same card)")
    ap.add_argument("--out", default=os.environ.get("OUT", ""))
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model, prompts = prepare(work, args)
    run_dir, wall = run_loop(model, prompts, work, args)
    ours = summarise(run_dir, args, wall)
    trl = trl_figures(args.trl)
    if trl:
        ours["trl"] = trl
    report(ours, trl)
    if args.out:
        Path(args.out, "loop.json").write_text(json.dumps(ours, indent=1))


if __name__ == "__main__":
    main()
