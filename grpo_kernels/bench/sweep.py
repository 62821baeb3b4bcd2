"""Tile sweep of the three logits-tile kernels against cuBLAS (CUDA only): which block shape to use.

    python -m grpo_kernels.bench.sweep [--shape 16384x8192x152064] [--tiles 128,256,64,8,8,3 ...] [--out best.txt]

For each tile config: the forward-statistics kernel over all N rows, the saving variant and the gradient kernel
over one backward chunk; each time over the cuBLAS bf16 matmul of the same rows (torch.mm). Prints a table and
writes the fastest config per kind as a `--tiles` spec for `python -m grpo_kernels.bench`.
"""

import argparse

import torch
import triton
import triton.testing

from grpo_kernels import _lm_head as lm

# bm, bv, bk, group_m, num_warps, num_stages[, tma, ws]
CANDIDATES = ["128,256,64,8,8,3", "128,256,64,16,8,3", "128,256,64,8,8,3,1", "128,256,64,8,8,4,1",
              "128,256,64,16,8,3,1", "256,128,64,8,8,3,1", "128,128,64,8,8,4,1"]


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m grpo_kernels.bench.sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="16384x8192x152064")
    p.add_argument("--tiles", nargs="+", default=CANDIDATES)
    p.add_argument("--rep-ms", type=int, default=300)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    n, h, v = (int(x) for x in args.shape.split("x"))
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    hid = torch.randn(n, h, device=dev, generator=g).bfloat16()
    w = (torch.randn(v, h, device=dev, generator=g) / h**0.5).bfloat16()
    y = torch.randint(0, v, (n,), device=dev, generator=g)
    f32 = dict(device=dev, dtype=torch.float32)
    lse, logp, ent = (torch.empty(n, **f32) for _ in range(3))
    c = min(n, lm.chunk_rows(v, 2))
    buf = torch.empty(c, v, device=dev, dtype=torch.float16)
    dl = torch.empty(c, v, device=dev, dtype=torch.bfloat16)
    coef = torch.randn(n, **f32)
    bench = lambda fn: triton.testing.do_bench(fn, warmup=50, rep=args.rep_ms)
    mm_all = bench(lambda: hid @ w.t())
    mm_c = bench(lambda: hid[:c] @ w.t())
    print(f"shape {args.shape}, chunk {c} rows; cuBLAS bf16 matmul: all rows {mm_all:.2f} ms "
          f"({2 * n * h * v / mm_all / 1e9:.0f} TFLOP/s), chunk {mm_c:.2f} ms; card {torch.cuda.get_device_name()}")
    print(f"{'tiles':<22} {'fwd ms':>8} {'x mm':>6} {'save ms':>8} {'x mm':>6} {'grad ms':>8} {'x mm':>6}")
    best = {}
    for spec in args.tiles:
        t = lm.Tiles(*[int(x) for x in spec.split(",")])
        for kind in ("fwd", "save", "grad"):
            lm.TILES[(kind, torch.bfloat16)] = t
        row = {}
        try:
            row["fwd"] = bench(lambda: lm.forward_stats(hid, w, y, 1.0, lse, logp, ent)) / mm_all
            row["save"] = bench(lambda: lm.forward_stats(hid[:c], w, y[:c], 1.0, lse[:c], logp[:c], ent[:c],
                                                         save=buf)) / mm_c
            row["grad"] = bench(lambda: lm.grad_logits(hid[:c], w, y[:c], lse[:c], ent[:c], coef[:c], coef[:c], 1.0,
                                                       dl, has_ent=True)) / mm_c
        except Exception as ex:  # a config that does not compile or fit is skipped
            print(f"{spec:<22} failed: {repr(ex)[:150]}")
            continue
        for kind, x in row.items():
            if x < best.get(kind, (None, 1e9))[1]:
                best[kind] = (spec, x)
        print(f"{spec:<22} {row['fwd'] * mm_all:8.2f} {row['fwd']:6.3f} {row['save'] * mm_c:8.2f} {row['save']:6.3f} "
              f"{row['grad'] * mm_c:8.2f} {row['grad']:6.3f}", flush=True)
    spec = ";".join(f"{k}={s}" for k, (s, _) in best.items())
    print("best:", spec)
    if args.out:
        with open(args.out, "w") as f:
            f.write(spec + "\n")


if __name__ == "__main__":
    main()
