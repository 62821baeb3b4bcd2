"""Triton kernels over the LM head: logits tiles (hidden @ weight.T) with softmax epilogues fused in.

Shared by `fused_logprob` and `fused_grpo_loss`. No kernel here ever stores a logits tensor of all tokens x vocab:

- `forward_stats` (one matmul): each program computes one [BM, BV] logits tile with `tl.dot` and reduces it to
  per-row partials (tile max, sum of exp, sum of exp * shifted logit, the target's logit); a second small kernel
  merges the partials of a row into logsumexp, log-prob and entropy. Extra memory: O(rows x vocab tiles).
  With `save`, the tile also writes z - tile_max into a caller's [C, V] buffer (fp16 for bf16 inputs: 10-bit
  mantissa on values <= 0, so the large probabilities keep their precision), for a chunk of C rows.
- `dlogits_from_saved` (no matmul): turns that buffer into dlogits in place (bf16 over the same bytes).
- `grad_logits` (one matmul, recomputing the logits): writes dlogits for a chunk of rows given their logsumexp.
- `accumulate_grads` (two cuBLAS matmuls): d_hidden[chunk] = dlogits @ W, d_weight += dlogits.T @ hidden[chunk].

dlogits of a row, for upstream coefficients c_lp (on the log-prob) and c_ent (on the entropy), with
p = softmax(z), z = x / T:  dL/dx_v = (c_lp * (1[v = target] - p_v) - c_ent * p_v * (log p_v + entropy)) / T.
"""

import dataclasses
import os

import torch
import triton
import triton.language as tl

try:
    INTERPRET = bool(triton.knobs.runtime.interpret)
except AttributeError:  # Triton < 3.4 has no knobs module
    INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")

# Extra memory for the per-chunk [C, V] buffer of the backward passes; chunks of rows are sized to fit it.
# Larger chunks mean fewer read-modify-write passes over d_weight: 960 MiB measured 3% faster than 768 MiB at
# N=16384, V=152064 (0.82 GiB extra in all).
BUFFER_BYTES = 960 * 2**20
# Rows per forward-only launch (the partials cost 12 bytes per row and vocab tile).
FWD_ROWS = 16384


@dataclasses.dataclass(frozen=True)
class Tiles:
    """Block shape and launch parameters of a logits-tile kernel."""

    bm: int
    bv: int
    bk: int
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 3
    tma: int = 0  # 1: load tiles through the Hopper tensor-memory accelerator (bf16, H % 8 == 0, CUDA only)
    ws: int = 0  # 1: ask Triton to warp-specialize the main loop (with tma)


# Per (kernel, input dtype); the bench may replace entries to sweep them. The interpreter gets small blocks.
# Kinds: "fwd" (forward statistics), "save" (the same, also storing the chunk for the GRPO loss), "grad".
# bf16: the fastest of `python -m grpo_kernels.bench.sweep` on an H200 (GPU_NOTES.md, "Kernels"); TMA loads took the
# main loop from 1.18x to 1.02x the cuBLAS matmul time.
TILES = {
    ("fwd", torch.bfloat16): Tiles(128, 256, 64, 16, 8, 3, tma=1),
    ("save", torch.bfloat16): Tiles(128, 256, 64, 16, 8, 3, tma=1),
    ("grad", torch.bfloat16): Tiles(256, 128, 64, 8, 8, 3, tma=1),
    ("fwd", torch.float32): Tiles(64, 64, 32, 8, 4, 2),
    ("save", torch.float32): Tiles(64, 64, 32, 8, 4, 2),
    ("grad", torch.float32): Tiles(64, 64, 32, 8, 4, 2),
}
INTERPRET_TILES = Tiles(16, 32, 16, 4, 1, 1)
DTYPES = (torch.bfloat16, torch.float32)


def tiles_for(kind, dtype):
    return INTERPRET_TILES if INTERPRET else TILES[(kind, dtype)]


def check_device(*tensors, name):
    """Raise a one-line ValueError unless the tensors can run these Triton kernels here."""
    dev = tensors[0].device
    if any(t.device != dev for t in tensors):
        raise ValueError(f"{name}: all tensors must be on one device, got {sorted({str(t.device) for t in tensors})}")
    if dev.type != "cuda" and not INTERPRET:
        raise ValueError(
            f"{name} runs Triton kernels and needs CUDA tensors (got {dev}); on the CPU use the torch reference "
            f"in grpo_kernels.reference, or set TRITON_INTERPRET=1 before importing triton to run the interpreter"
        )


def check_lm_inputs(hidden, weight, targets, temperature, *, name):
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"{name}: expected hidden [N, H] and weight [V, H], got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if targets.shape != (hidden.shape[0],):
        raise ValueError(f"{name}: expected targets of shape ({hidden.shape[0]},), got {tuple(targets.shape)}")
    if hidden.dtype != weight.dtype or hidden.dtype not in DTYPES:
        raise ValueError(
            f"{name}: hidden and weight must share one dtype, bfloat16 or float32; got {hidden.dtype} and "
            f"{weight.dtype} (cast them first)"
        )
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name}: targets must be int64 or int32 token ids, got {targets.dtype}")
    if not temperature > 0:
        raise ValueError(f"{name}: temperature must be > 0, got {temperature}")
    check_device(hidden, weight, targets, name=name)


def row_chunks(n, rows):
    """Split range(n) into near-equal chunks of at most `rows` rows, each a multiple of 128 but the last."""
    if n == 0:
        return []
    count = max(1, triton.cdiv(n, rows))
    step = min(rows, triton.cdiv(triton.cdiv(n, count), 128) * 128)
    return [(r0, min(n, r0 + step)) for r0 in range(0, n, step)]


def chunk_rows(v, elem_bytes):
    """Rows of a [C, V] buffer that fit BUFFER_BYTES (at least 128)."""
    return max(128, BUFFER_BYTES // (v * elem_bytes) // 128 * 128)


@triton.jit
def _tile_ids(pid, n_rows, V, BM: tl.constexpr, BV: tl.constexpr, GROUP_M: tl.constexpr):
    # Grouped order: GROUP_M row blocks sweep the vocabulary together, so their hidden rows stay in L2.
    num_m = tl.cdiv(n_rows, BM)
    num_v = tl.cdiv(V, BV)
    per_group = GROUP_M * num_v
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_v = (pid % per_group) // size_m
    return pid_m, pid_v


@triton.jit
def _logits_tile(h_ptr, w_ptr, pid_m, pid_v, n_rows, V, H, stride_h, stride_w, inv_t,
                 BM: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr,
                 UPCAST: tl.constexpr, IEEE: tl.constexpr, TMA: tl.constexpr, WS: tl.constexpr):
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_v * BV + tl.arange(0, BV)
    acc = tl.zeros((BM, BV), dtype=tl.float32)
    if TMA:  # h_ptr and w_ptr are tensor descriptors; out-of-range rows, columns and K are zero-filled
        for k in tl.range(0, tl.cdiv(H, BK), warp_specialize=WS):
            a = h_ptr.load([pid_m * BM, k * BK])
            b = w_ptr.load([pid_v * BV, k * BK])
            acc = tl.dot(a, b.T, acc)
    else:
        # Clamped indices let the main loop run without row/column masks; those results are never stored.
        rows_c = tl.minimum(rows, n_rows - 1).to(tl.int64)
        cols_c = tl.minimum(cols, V - 1).to(tl.int64)
        ks = tl.arange(0, BK)
        h_ptrs = h_ptr + rows_c[:, None] * stride_h + ks[None, :]
        w_ptrs = w_ptr + cols_c[:, None] * stride_w + ks[None, :]
        for k in range(0, tl.cdiv(H, BK)):
            if EVEN_K:
                a = tl.load(h_ptrs)
                b = tl.load(w_ptrs)
            else:
                k_ok = (k * BK + ks) < H
                a = tl.load(h_ptrs, mask=k_ok[None, :], other=0.0)
                b = tl.load(w_ptrs, mask=k_ok[None, :], other=0.0)
            if UPCAST:  # the CPU interpreter mishandles bf16 dots; the upcast products are exact
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            if IEEE:
                acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, tl.trans(b), acc)
            h_ptrs += BK
            w_ptrs += BK
    return acc * inv_t, rows, cols


@triton.jit
def _fwd_kernel(h_ptr, w_ptr, tgt_ptr, pm_ptr, ps_ptr, pa_ptr, tz_ptr, s_ptr,
                n_rows, V, H, stride_h, stride_w, stride_s, n_vt, inv_t,
                SAVE: tl.constexpr, BM: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr,
                GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
                TMA: tl.constexpr, WS: tl.constexpr):
    pid_m, pid_v = _tile_ids(tl.program_id(0), n_rows, V, BM, BV, GROUP_M)
    z, rows, cols = _logits_tile(h_ptr, w_ptr, pid_m, pid_v, n_rows, V, H, stride_h, stride_w, inv_t,
                                 BM, BV, BK, EVEN_K, UPCAST, IEEE, TMA, WS)
    row_ok = rows < n_rows
    col_ok = cols < V
    z = tl.where(col_ok[None, :], z, float("-inf"))
    m = tl.max(z, axis=1)
    d = z - m[:, None]
    e = tl.exp(d)
    s = tl.sum(e, axis=1)
    a = tl.sum(e * tl.where(col_ok[None, :], d, 0.0), axis=1)
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
    zt = tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)
    has_t = row_ok & (tgt >= pid_v * BV) & (tgt < pid_v * BV + BV)
    off = rows.to(tl.int64) * n_vt + pid_v
    tl.store(pm_ptr + off, m, mask=row_ok)
    tl.store(ps_ptr + off, s, mask=row_ok)
    tl.store(pa_ptr + off, a, mask=row_ok)
    tl.store(tz_ptr + rows, zt, mask=has_t)
    if SAVE:
        s_ptrs = s_ptr + rows[:, None].to(tl.int64) * stride_s + cols[None, :]
        tl.store(s_ptrs, d.to(s_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _merge_kernel(pm_ptr, ps_ptr, pa_ptr, tz_ptr, lse_ptr, logp_ptr, ent_ptr, n_rows, n_vt,
                  BR: tl.constexpr, BT: tl.constexpr):
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    row_ok = rows < n_rows
    base = rows.to(tl.int64)[:, None] * n_vt
    big_m = tl.full((BR,), float("-inf"), tl.float32)
    for t0 in range(0, n_vt, BT):
        ts = t0 + tl.arange(0, BT)
        ok = row_ok[:, None] & (ts < n_vt)[None, :]
        m = tl.load(pm_ptr + base + ts[None, :], mask=ok, other=float("-inf"))
        big_m = tl.maximum(big_m, tl.max(m, axis=1))
    big_m = tl.where(row_ok, big_m, 0.0)
    tot_s = tl.zeros((BR,), tl.float32)
    tot_a = tl.zeros((BR,), tl.float32)
    for t0 in range(0, n_vt, BT):
        ts = t0 + tl.arange(0, BT)
        ok = row_ok[:, None] & (ts < n_vt)[None, :]
        m = tl.load(pm_ptr + base + ts[None, :], mask=ok, other=0.0)
        s = tl.load(ps_ptr + base + ts[None, :], mask=ok, other=0.0)
        a = tl.load(pa_ptr + base + ts[None, :], mask=ok, other=0.0)
        shift = m - big_m[:, None]
        scale = tl.where(ok, tl.exp(shift), 0.0)
        tot_s += tl.sum(scale * s, axis=1)
        tot_a += tl.sum(tl.where(ok, scale * (a + shift * s), 0.0), axis=1)
    tot_s = tl.where(row_ok, tot_s, 1.0)
    log_s = tl.log(tot_s)
    lse = big_m + log_s
    tz = tl.load(tz_ptr + rows, mask=row_ok, other=0.0)
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    tl.store(logp_ptr + rows, tz - lse, mask=row_ok)
    tl.store(ent_ptr + rows, log_s - tot_a / tot_s, mask=row_ok)


@triton.jit
def _dlogit(z_minus_lse, is_tgt, ent, c_lp, c_ent, inv_t, HAS_ENT: tl.constexpr):
    p = tl.exp(z_minus_lse)
    g = tl.where(is_tgt, c_lp[:, None] * (1.0 - p), -c_lp[:, None] * p)
    if HAS_ENT:
        g -= c_ent[:, None] * p * (z_minus_lse + ent[:, None])
    return g * inv_t


@triton.jit
def _grad_kernel(h_ptr, w_ptr, tgt_ptr, lse_ptr, ent_ptr, clp_ptr, cent_ptr, d_ptr,
                 n_rows, V, H, stride_h, stride_w, stride_d, inv_t,
                 HAS_ENT: tl.constexpr, BM: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr,
                 GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
                TMA: tl.constexpr, WS: tl.constexpr):
    pid_m, pid_v = _tile_ids(tl.program_id(0), n_rows, V, BM, BV, GROUP_M)
    z, rows, cols = _logits_tile(h_ptr, w_ptr, pid_m, pid_v, n_rows, V, H, stride_h, stride_w, inv_t,
                                 BM, BV, BK, EVEN_K, UPCAST, IEEE, TMA, WS)
    row_ok = rows < n_rows
    col_ok = cols < V
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    ent = tl.load(ent_ptr + rows, mask=row_ok, other=0.0)
    c_lp = tl.load(clp_ptr + rows, mask=row_ok, other=0.0)
    c_ent = tl.load(cent_ptr + rows, mask=row_ok, other=0.0)
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
    g = _dlogit(z - lse[:, None], cols[None, :] == tgt[:, None], ent, c_lp, c_ent, inv_t, HAS_ENT)
    d_ptrs = d_ptr + rows[:, None].to(tl.int64) * stride_d + cols[None, :]
    tl.store(d_ptrs, g.to(d_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _dlogits_saved_kernel(s_ptr, d_ptr, pm_ptr, tgt_ptr, lse_ptr, ent_ptr, clp_ptr, cent_ptr,
                          V, stride_s, n_vt, inv_t,
                          HAS_ENT: tl.constexpr, TILE_V: tl.constexpr, BC: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    ok = cols < V
    off = row.to(tl.int64) * stride_s + cols
    d = tl.load(s_ptr + off, mask=ok, other=0.0).to(tl.float32)
    m = tl.load(pm_ptr + row.to(tl.int64) * n_vt + cols // TILE_V, mask=ok, other=0.0)
    # Row scalars as 1-element vectors so that _dlogit's [:, None] broadcasting applies.
    one = tl.arange(0, 1)
    lse = tl.load(lse_ptr + row + one)
    ent = tl.load(ent_ptr + row + one)
    c_lp = tl.load(clp_ptr + row + one)
    c_ent = tl.load(cent_ptr + row + one)
    tgt = tl.load(tgt_ptr + row + one)
    g = _dlogit(d[None, :] + (m[None, :] - lse[:, None]), cols[None, :] == tgt[:, None], ent, c_lp, c_ent,
                inv_t, HAS_ENT)
    # In place: each element is read above and written here by the same program.
    tl.store(d_ptr + off[None, :], g.to(d_ptr.dtype.element_ty), mask=ok[None, :])


def _use_tma(hidden, weight, tiles):
    # TMA needs 16-byte aligned bases and row strides.
    return (bool(tiles.tma) and not INTERPRET and hidden.dtype == torch.bfloat16 and hidden.shape[1] % 8 == 0
            and hidden.data_ptr() % 16 == 0 and weight.data_ptr() % 16 == 0)


def _operands(hidden, weight, tiles):
    """The h_ptr, w_ptr kernel arguments: the tensors, or TMA descriptors of their tiles."""
    if not _use_tma(hidden, weight, tiles):
        return hidden, weight
    from triton.tools.tensor_descriptor import TensorDescriptor
    return (TensorDescriptor.from_tensor(hidden, [tiles.bm, tiles.bk]),
            TensorDescriptor.from_tensor(weight, [tiles.bv, tiles.bk]))


def _common(hidden, weight, tiles):
    return dict(n_rows=hidden.shape[0], V=weight.shape[0], H=hidden.shape[1], stride_h=hidden.stride(0),
                stride_w=weight.stride(0))


def _meta(hidden, weight, tiles):
    tma = _use_tma(hidden, weight, tiles)
    return dict(BM=tiles.bm, BV=tiles.bv, BK=tiles.bk, GROUP_M=tiles.group_m, EVEN_K=hidden.shape[1] % tiles.bk == 0,
                UPCAST=INTERPRET, IEEE=hidden.dtype == torch.float32 and not INTERPRET, TMA=tma,
                WS=tma and bool(tiles.ws), num_warps=tiles.num_warps, num_stages=tiles.num_stages)


def forward_stats(hidden, weight, targets, inv_t, lse, logp, ent, *, save=None):
    """Fill lse, logp, ent ([n] float32 views) for the rows of `hidden` ([n, H], contiguous rows).

    With `save` (a [n, V] buffer, float16 for bf16 inputs, float32 for float32), also store z - tile_max there
    and return (the [n, vocab tiles] tile maxima, the tile width) that `dlogits_from_saved` needs.
    """
    n, v = hidden.shape[0], weight.shape[0]
    tiles = tiles_for("fwd" if save is None else "save", hidden.dtype)
    n_vt = triton.cdiv(v, tiles.bv)
    dev = hidden.device
    pm, ps, pa = (torch.empty(n, n_vt, device=dev, dtype=torch.float32) for _ in range(3))
    tz = torch.full((n,), float("nan"), device=dev, dtype=torch.float32)  # stays NaN for a target outside [0, V)
    grid = (triton.cdiv(n, tiles.bm) * n_vt,)
    _fwd_kernel[grid](*_operands(hidden, weight, tiles), targets, pm, ps, pa, tz, save if save is not None else pm,
                      stride_s=save.stride(0) if save is not None else 0, n_vt=n_vt, inv_t=inv_t,
                      SAVE=save is not None, **_common(hidden, weight, tiles), **_meta(hidden, weight, tiles))
    br = 16
    _merge_kernel[(triton.cdiv(n, br),)](pm, ps, pa, tz, lse, logp, ent, n, n_vt, BR=br, BT=64)
    return (pm, tiles.bv) if save is not None else None


def dlogits_from_saved(buf, tile_max, tile_v, targets, lse, ent, c_lp, c_ent, inv_t, *, has_ent):
    """Overwrite `buf` (from forward_stats(save=buf)) with dlogits; returns them as a bf16 (or float32) view."""
    n, v = buf.shape
    out = buf.view(torch.bfloat16) if buf.dtype == torch.float16 else buf
    bc = 256 if INTERPRET else 2048
    _dlogits_saved_kernel[(n, triton.cdiv(v, bc))](
        buf, out, tile_max, targets, lse, ent, c_lp, c_ent, v, buf.stride(0), tile_max.shape[1], inv_t,
        HAS_ENT=has_ent, TILE_V=tile_v, BC=bc, num_warps=4)
    return out


def grad_logits(hidden, weight, targets, lse, ent, c_lp, c_ent, inv_t, out, *, has_ent):
    """Write dlogits of the rows of `hidden` into `out` ([n, V], hidden's dtype), recomputing the logits."""
    tiles = tiles_for("grad", hidden.dtype)
    grid = (triton.cdiv(hidden.shape[0], tiles.bm) * triton.cdiv(weight.shape[0], tiles.bv),)
    _grad_kernel[grid](*_operands(hidden, weight, tiles), targets, lse, ent, c_lp, c_ent, out, stride_d=out.stride(0), inv_t=inv_t,
                       HAS_ENT=has_ent, **_common(hidden, weight, tiles), **_meta(hidden, weight, tiles))
    return out


def accumulate_grads(dlogits, hidden, weight, d_hidden, d_weight, *, first):
    """d_hidden (a [n, H] view or None) = dlogits @ W; d_weight (or None) = / += dlogits.T @ hidden."""
    if d_hidden is not None:
        torch.mm(dlogits, weight, out=d_hidden)
    if d_weight is not None:
        if first:
            torch.mm(dlogits.t(), hidden, out=d_weight)
        else:
            d_weight.addmm_(dlogits.t(), hidden)
