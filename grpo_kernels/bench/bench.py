"""Benchmark of the LM-head hot path: log-probs (forward, forward+backward) and the GRPO loss, per provider.

    python -m grpo_kernels.bench [--shapes 16384x8192x152064 ...] [--ops logprob_fwd,logprob,grpo]
                            [--providers ours,eager,compile,liger,cce] [--rep-ms 1000]

Providers (each skipped, with the reason, when not installed): ours (grpo_kernels.fused_logprob / fused_grpo_loss),
eager (bf16 logits + log_softmax in torch), compile (torch.compile of eager), liger (Liger-Kernel's fused linear
cross entropy; its fused linear GRPO loss for `grpo`), cce (Apple's Cut Cross-Entropy). For each: median time
(triton.testing.do_bench), TFLOP/s, x roofline (forward: one N x H x V bf16 matmul measured in the same run;
forward+backward: three), peak extra GiB (above inputs and gradients) and errors against float32 on the first
512 rows (relative norms of log-probs and of d_hidden). Rows are appended to a CSV (card, versions, git sha) and
a plot of x roofline is drawn.
"""

import argparse
import csv
import datetime
import importlib.metadata
import os
import subprocess
import time

import torch

import grpo_kernels
from grpo_kernels import _lm_head as lm

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_SHAPES = ["4096x8192x152064", "8192x8192x152064", "16384x8192x152064", "4096x3584x152064",
                  "16384x3584x152064"]
OPS = ("logprob_fwd", "logprob", "grpo")
PROVIDERS = ("ours", "eager", "compile", "liger", "cce")
SEQ_LEN = 1024  # rows per sequence for the GRPO layout (Liger wants [B, T])
REF_ROWS = 512
FIELDS = ["date", "card", "torch", "triton", "liger", "cce", "git_sha", "op", "provider", "N", "H", "V", "dtype",
          "ms", "ms_p20", "ms_p80", "matmul_ms", "matmul_tflops", "x_roofline", "tflops", "peak_extra_gib",
          "err_logp", "err_grad_h", "tiles", "buffer_mib", "error"]


def naive_logp(h, w, y):
    return (h @ w.t()).float().log_softmax(-1).gather(-1, y[:, None]).squeeze(-1)


def grpo_torch(h, w, y, old, ref, adv, mask, scale):
    """verl's per-token GRPO loss (dual clip, k3 KL at 0.001) on full bf16 logits, summed with `scale`."""
    logp = naive_logp(h, w, y)
    neg_kl = (logp - old).clamp(-20.0, 20.0)
    ratio = torch.exp(neg_kl)
    lc = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.2))
    pg = torch.where(adv < 0, torch.minimum(lc, -adv * 3.0), lc)
    x = (ref - logp).clamp(-20.0, 20.0)
    kl = (torch.exp(x) - x - 1).clamp(-10.0, 10.0)
    return ((pg + 0.001 * kl) * mask * scale).sum()


def _version(dist):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return ""


def git_sha():
    if os.environ.get("BENCH_GIT_SHA"):
        return os.environ["BENCH_GIT_SHA"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "."], cwd=os.path.dirname(HERE),
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except OSError:
        return ""


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, dev, rep_ms):
    """(median, p20, p80) in ms: triton.testing.do_bench on CUDA, a plain wall clock elsewhere."""
    if dev.type == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, warmup=max(rep_ms // 4, 1), rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    fn()
    ts = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    ts.sort()
    return ts[1], ts[0], ts[2]


def peak_extra_gib(fn, dev):
    if dev.type != "cuda":
        return float("nan")
    _sync(dev)
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    _sync(dev)
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


class Case:
    """Inputs of one shape and the float32 references on the first REF_ROWS rows."""

    def __init__(self, n, h, v, dtype, dev):
        g = torch.Generator(device=dev).manual_seed(0)
        self.n, self.h, self.v, self.dev = n, h, v, dev
        self.h0 = torch.randn(n, h, device=dev, generator=g).to(dtype)
        self.w0 = (torch.randn(v, h, device=dev, generator=g) / h**0.5).to(dtype)
        self.y = torch.randint(0, v, (n,), device=dev, generator=g)
        self.go = torch.randn(n, device=dev, generator=g)
        with torch.no_grad():
            lp = grpo_kernels.fused_logprob(self.h0, self.w0, self.y) if grpo_kernels.triton_available(dev) else \
                naive_logp(self.h0, self.w0, self.y)
        self.old = lp + 0.1 * torch.randn(n, device=dev, generator=g)
        self.ref = lp + 0.1 * torch.randn(n, device=dev, generator=g)
        b = max(1, n // SEQ_LEN)
        self.adv = torch.randn(b, device=dev, generator=g).repeat_interleave(SEQ_LEN)[:n]
        self.adv = torch.cat([self.adv, self.adv.new_zeros(n - self.adv.numel())])
        self.mask = (torch.rand(n, device=dev, generator=g) > 0.05).float()
        self.scale = 1.0 / self.mask.sum()
        self._refs()

    def _refs(self):
        ns = min(self.n, REF_ROWS)
        hr = self.h0[:ns].float().requires_grad_(True)
        wr = self.w0.float()
        prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            lp = naive_logp(hr, wr, self.y[:ns])
            (lp * self.go[:ns]).sum().backward()
            self.ref_lp, self.ref_gh_lp = lp.detach(), hr.grad
            hr.grad = None
            s = slice(0, ns)
            grpo_torch(hr, wr, self.y[s], self.old[s], self.ref[s], self.adv[s], self.mask[s], self.scale).backward()
            self.ref_gh_grpo = hr.grad
        finally:
            torch.backends.cuda.matmul.allow_tf32 = prev
        del wr
        self.ns = ns


def providers_for(op, case):
    """{name: (step(h, w) -> (logp or None), loss tensor or None)} for the providers that exist; skips: {name: why}."""
    c = case
    out, skip = {}, {}

    def ours_logprob(h, w):
        return grpo_kernels.fused_logprob(h, w, c.y), None

    def ours_grpo(h, w):
        loss, st = grpo_kernels.fused_grpo_loss(h, w, c.y, old_logp=c.old, advantages=c.adv, mask=c.mask, scale=c.scale,
                                           ref_logp=c.ref, kl_coef=0.001)
        return st["logp"], loss

    def eager_grpo(h, w):
        return None, grpo_torch(h, w, c.y, c.old, c.ref, c.adv, c.mask, c.scale)

    if op == "grpo":
        out["ours"] = ours_grpo
        out["eager"] = eager_grpo
        compiled = torch.compile(grpo_torch, dynamic=False)
        out["compile"] = lambda h, w: (None, compiled(h, w, c.y, c.old, c.ref, c.adv, c.mask, c.scale))
        try:
            from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
            if c.n % SEQ_LEN:
                raise ValueError(f"N={c.n} is not a multiple of T={SEQ_LEN}")
            lg = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="grpo", chunk_size=1,
                                          compiled=True)
            b = c.n // SEQ_LEN

            def liger_grpo(h, w):
                res = lg(h.view(b, SEQ_LEN, c.h), w, c.y.view(b, SEQ_LEN), c.mask.view(b, SEQ_LEN).long(),
                         c.adv.view(b, SEQ_LEN)[:, 0], old_per_token_logps=c.old.view(b, SEQ_LEN))
                return None, res[0] if isinstance(res, tuple) else res
            out["liger"] = liger_grpo
        except Exception as ex:  # missing package or unsupported shape: a finding, not a failure
            skip["liger"] = repr(ex)[:200]
        skip["cce"] = "no GRPO loss in cut-cross-entropy"
        return out, skip

    out["ours"] = ours_logprob
    out["eager"] = lambda h, w: (naive_logp(h, w, c.y), None)
    compiled = torch.compile(naive_logp, dynamic=False)
    out["compile"] = lambda h, w: (compiled(h, w, c.y), None)
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
        flce = LigerFusedLinearCrossEntropyLoss(reduction="none")
        out["liger"] = lambda h, w: (-flce(w, h, c.y), None)
    except Exception as ex:
        skip["liger"] = repr(ex)[:200]
    try:
        from cut_cross_entropy import linear_cross_entropy
        out["cce"] = lambda h, w: (-linear_cross_entropy(h, w, c.y, reduction="none"), None)
    except Exception as ex:
        skip["cce"] = repr(ex)[:200]
    return out, skip


def run_one(op, name, fn, case, rep_ms):
    c, dev = case, case.dev
    backward = op != "logprob_fwd"
    h = c.h0.clone().requires_grad_(backward)
    w = c.w0.clone().requires_grad_(backward)

    def step():
        if not backward:
            with torch.no_grad():
                return fn(h, w)
        h.grad = w.grad = None
        logp, loss = fn(h, w)
        if loss is None:
            loss = (logp.float() * c.go).sum()
        loss.backward()
        return logp, loss

    res = {}
    try:
        logp, _ = step()
        comparable = not (op == "grpo" and name == "liger")  # Liger's GRPO has no KL term and its own scaling
        if logp is not None:
            res["err_logp"] = rel_err(logp[:c.ns].detach().float(), c.ref_lp)
        if backward and comparable:
            ref = c.ref_gh_grpo if op == "grpo" else c.ref_gh_lp
            res["err_grad_h"] = rel_err(h.grad[:c.ns].float(), ref)
        del logp
        res["ms"], res["ms_p20"], res["ms_p80"] = time_ms(step, dev, rep_ms)
        res["peak_extra_gib"] = peak_extra_gib(step, dev)
    except Exception as ex:  # an OOM or a peer's failure at a size is a result to record
        res["error"] = repr(ex)[:300]
    finally:
        del h, w
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return res


def tiles_desc(dtype):
    return ";".join(f"{kind}={t.bm}x{t.bv}x{t.bk}g{t.group_m}w{t.num_warps}s{t.num_stages}{'t' if t.tma else ''}"
                    for kind, t in ((k, lm.tiles_for(k, dtype)) for k in ("fwd", "save", "grad")))


def set_tiles(spec):
    """--tiles 'fwd=128,256,64,8,8,3,1;save=...;grad=...' (bm, bv, bk, group_m, warps, stages[, tma, ws]), bf16."""
    for part in filter(None, spec.split(";")):
        kind, vals = part.split("=")
        lm.TILES[(kind.strip(), torch.bfloat16)] = lm.Tiles(*[int(x) for x in vals.split(",")])


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m grpo_kernels.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="NxHxV, e.g. 16384x8192x152064")
    p.add_argument("--ops", default=",".join(OPS))
    p.add_argument("--providers", default=",".join(PROVIDERS))
    p.add_argument("--peers-shapes", nargs="*", default=None,
                   help="run providers other than 'ours' only at these shapes (default: every shape)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--rep-ms", type=int, default=1000, help="do_bench repetition budget per measurement")
    p.add_argument("--tiles", default="", help="override tiles: 'fwd=bm,bv,bk,group,warps,stages;save=...;grad=...'")
    p.add_argument("--buffer-mib", type=int, default=None, help="override the backward buffer budget")
    p.add_argument("--csv", default=os.path.join(HERE, "results", "results.csv"))
    p.add_argument("--plot", default=None, help="PNG path (default: results/<card>.png beside the CSV)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    dev = torch.device(args.device)
    if not grpo_kernels.triton_available(dev):
        raise SystemExit(f"error: the Triton kernels cannot run on {dev} here (CUDA, or TRITON_INTERPRET=1 on the CPU)")
    set_tiles(args.tiles)
    if args.buffer_mib:
        lm.BUFFER_BYTES = args.buffer_mib * 2**20
    dtype = getattr(torch, args.dtype)
    card = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    meta = dict(date=datetime.date.today().isoformat(), card=card, torch=torch.__version__,
                triton=_version("triton"), liger=_version("liger-kernel"), cce=_version("cut-cross-entropy"),
                git_sha=git_sha(), dtype=args.dtype, tiles=tiles_desc(dtype), buffer_mib=lm.BUFFER_BYTES // 2**20)
    ops = [o for o in args.ops.split(",") if o]
    wanted = [q for q in args.providers.split(",") if q]
    for o in ops:
        if o not in OPS:
            raise SystemExit(f"error: unknown op {o!r}; valid: {', '.join(OPS)}")
    rows = []
    for shape in args.shapes:
        n, h, v = (int(x) for x in shape.split("x"))
        t0 = time.time()
        case = Case(n, h, v, dtype, dev)
        mm = time_ms(lambda: case.h0 @ case.w0.t(), dev, args.rep_ms)[0]
        base = dict(meta, N=n, H=h, V=v, matmul_ms=round(mm, 3), matmul_tflops=round(2.0 * n * h * v / mm / 1e9, 1))
        for op in ops:
            fns, skips = providers_for(op, case)
            for name in wanted:
                if name != "ours" and args.peers_shapes is not None and shape not in args.peers_shapes:
                    continue
                row = dict(base, op=op, provider=name)
                if name in skips or name not in fns:
                    row["error"] = skips.get(name, "not available")
                else:
                    res = run_one(op, name, fns[name], case, args.rep_ms)
                    row.update(res)
                    if "ms" in res:
                        passes = 1 if op == "logprob_fwd" else 3
                        row["x_roofline"] = res["ms"] / (passes * mm)
                        row["tflops"] = 2.0 * passes * n * h * v / res["ms"] / 1e9
                rows.append(row)
                _print_row(row)
                _append_csv(args.csv, row)
        del case
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        print(f"# shape {shape} done in {time.time() - t0:.0f}s", flush=True)
    print_table(rows)
    plot(rows, args.plot or os.path.join(os.path.dirname(args.csv), f"{_slug(card)}.png"))


def _slug(s):
    return "".join(ch if ch.isalnum() else "-" for ch in s).strip("-").lower()


def _fmt(row):
    if row.get("error"):
        return f"{row['op']:<12} {row['provider']:<8} {row['N']:>6} {row['H']:>5} {row['V']:>7}  " \
               f"-- {str(row['error'])[:90]}"
    g = lambda k, f: format(row[k], f) if isinstance(row.get(k), float) else "-"
    return (f"{row['op']:<12} {row['provider']:<8} {row['N']:>6} {row['H']:>5} {row['V']:>7} {g('ms', '9.2f')} "
            f"{g('tflops', '8.1f')} {g('x_roofline', '6.2f')} {g('peak_extra_gib', '6.2f')} {g('err_logp', '8.1e')} "
            f"{g('err_grad_h', '8.1e')}")


HEADER = f"{'op':<12} {'provider':<8} {'N':>6} {'H':>5} {'V':>7} {'ms':>9} {'TFLOP/s':>8} {'xroof':>6} " \
         f"{'GiB+':>6} {'err_lp':>8} {'err_gh':>8}"


def _print_row(row):
    print(_fmt(row), flush=True)


def print_table(rows):
    if not rows:
        return
    print(f"\ncard: {rows[0]['card']}; x roofline: forward vs one N x H x V bf16 matmul, forward+backward vs three "
          f"(matmul measured in the same run)")
    print(HEADER)
    for r in rows:
        print(_fmt(r))
    print("matmul ms per shape:", sorted({(r["N"], r["H"], r["V"], r["matmul_ms"]) for r in rows}))


def _append_csv(path, row):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        if new:
            wr.writeheader()
        wr.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


YCAP = 2.5  # y limit of the plot's panels


def plot(rows, path):
    """Bars of x roofline per provider, one panel per op, shapes along the x axis."""
    ok = [r for r in rows if isinstance(r.get("x_roofline"), float)]
    if not ok:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ops = [o for o in OPS if any(r["op"] == o for r in ok)]
    fig, axes = plt.subplots(1, len(ops), figsize=(6 * len(ops), 4), squeeze=False)
    for ax, op in zip(axes[0], ops):
        sel = [r for r in ok if r["op"] == op]
        shapes = sorted({(r["N"], r["H"]) for r in sel})
        provs = [q for q in PROVIDERS if any(r["provider"] == q for r in sel)]
        width = 0.8 / max(len(provs), 1)
        for i, q in enumerate(provs):
            ys = [next((r["x_roofline"] for r in sel if r["provider"] == q and (r["N"], r["H"]) == s), 0.0)
                  for s in shapes]
            xs = [j + i * width for j in range(len(shapes))]
            ax.bar(xs, [min(y, YCAP) for y in ys], width, label=q)
            for x, y in zip(xs, ys):
                if y > YCAP:  # a bar off the scale gets its value written at the top
                    ax.text(x, YCAP * 0.97, f"{y:.1f}x", ha="center", va="top", rotation=90, fontsize=7)
        ax.set_ylim(0, YCAP)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))])
        ax.set_xticklabels([f"N={n}\nH={h}" for n, h in shapes])
        ax.set_title(f"{op} (x matmul roofline, lower is better)")
        ax.legend(fontsize=8)
    fig.suptitle(f"{ok[0]['card']}, V={ok[0]['V']}, {ok[0]['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"plot: {path}")
