"""Fused GRPO loss over the LM head: clipped surrogate (dual clip), KL and entropy terms, gradients in one pass.

verl's numerics (`compute_policy_loss_vanilla`, `kl_penalty`, `agg_loss`; `grpo/loss.py` is the torch version).
Per chunk of token rows: one Triton pass computes the logits tiles (the only logits matmul), the log-probs and
entropy, keeps z - tile_max in a [chunk, V] fp16 buffer, and then, since the per-token upstream gradient is known
once the chunk's log-probs are, turns that buffer into dlogits in place; two cuBLAS matmuls give d_hidden and
d_weight. Three N x H x V matmuls in all, where a separate log-prob op followed by the loss needs four.
"""

import torch
import triton
import triton.language as tl

from . import _lm_head as lm

KL_KINDS = {"kl": 0, "k1": 0, "abs": 1, "mse": 2, "k2": 2, "low_var_kl": 3, "k3": 3}
AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


@triton.jit
def _max_grad(a, b, ga, gb):
    # Gradient of torch.maximum(a, b): ties split the gradient evenly, as torch does.
    return tl.where(a > b, ga, tl.where(a < b, gb, 0.5 * (ga + gb)))


@triton.jit
def _token_kernel(logp_ptr, ent_ptr, old_ptr, ref_ptr, adv_ptr, mask_ptr, scale_ptr,
                  loss_ptr, clp_ptr, cent_ptr, pg_ptr, kl_ptr, n,
                  clip_low, clip_high, clip_c, kl_coef, ent_coef,
                  HAS_REF: tl.constexpr, KL_KIND: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    m = tl.load(mask_ptr + i, mask=ok, other=0.0)
    active = ok & (m != 0)
    logp = tl.load(logp_ptr + i, mask=ok, other=0.0)
    ent = tl.load(ent_ptr + i, mask=ok, other=0.0)
    old = tl.load(old_ptr + i, mask=ok, other=0.0)
    adv = tl.load(adv_ptr + i, mask=ok, other=0.0)
    w = tl.load(scale_ptr + i, mask=ok, other=0.0)
    # Policy term: ratio = exp(clamp(logp - old, -20, 20)); clamp passes the gradient on [-20, 20].
    diff = logp - old
    neg_kl = tl.minimum(tl.maximum(diff, -20.0), 20.0)
    ratio = tl.exp(neg_kl)
    d_ratio = tl.where((diff >= -20.0) & (diff <= 20.0), ratio, 0.0)
    lo = 1.0 - clip_low
    hi = 1.0 + clip_high
    l1 = -adv * ratio
    l2 = -adv * tl.minimum(tl.maximum(ratio, lo), hi)
    g1 = -adv * d_ratio
    g2 = tl.where((ratio >= lo) & (ratio <= hi), g1, 0.0)
    lc = tl.maximum(l1, l2)
    gc = _max_grad(l1, l2, g1, g2)
    l3 = -adv * clip_c
    lmin = tl.minimum(lc, l3)
    gmin = tl.where(lc < l3, gc, tl.where(lc > l3, 0.0, 0.5 * gc))  # torch.minimum's rule
    neg = adv < 0
    pg = tl.where(neg, lmin, lc)
    g_pg = tl.where(neg, gmin, gc)
    kl = tl.zeros_like(logp)
    g_kl = tl.zeros_like(logp)
    if HAS_REF:
        ref = tl.load(ref_ptr + i, mask=ok, other=0.0)
        d = logp - ref
        if KL_KIND == 0:
            kl = d
            g_kl = tl.full(d.shape, 1.0, tl.float32)
        elif KL_KIND == 1:
            kl = tl.abs(d)
            g_kl = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
        elif KL_KIND == 2:
            kl = 0.5 * d * d
            g_kl = d
        else:
            x = tl.minimum(tl.maximum(-d, -20.0), 20.0)
            g_x = tl.where((d >= -20.0) & (d <= 20.0), -1.0, 0.0)
            ex = tl.exp(x)
            raw = ex - x - 1.0
            kl = tl.minimum(tl.maximum(raw, -10.0), 10.0)
            g_kl = tl.where((raw >= -10.0) & (raw <= 10.0), (ex - 1.0) * g_x, 0.0)
    total = pg + kl_coef * kl - ent_coef * ent
    s = tl.where(active, m * w, 0.0)
    tl.store(loss_ptr + i, tl.where(active, total * s, 0.0), mask=ok)
    tl.store(clp_ptr + i, tl.where(active, (g_pg + kl_coef * g_kl) * s, 0.0), mask=ok)
    tl.store(cent_ptr + i, tl.where(active, -ent_coef * s, 0.0), mask=ok)
    tl.store(pg_ptr + i, pg, mask=ok)
    tl.store(kl_ptr + i, kl, mask=ok)


class _FusedGRPOLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, old, ref, adv, mask, scale, cfg, need_h, need_w):
        n, v = hidden.shape[0], weight.shape[0]
        dev = hidden.device
        f32 = dict(device=dev, dtype=torch.float32)
        lse, logp, ent, loss_tok, c_lp, c_ent, pg_tok, kl_tok = (torch.empty(n, **f32) for _ in range(8))
        grads = need_h or need_w
        d_hidden = torch.empty_like(hidden) if need_h else None
        d_weight = (torch.zeros_like(weight) if n == 0 else torch.empty_like(weight)) if need_w else None
        buf_dtype = torch.float16 if hidden.dtype == torch.bfloat16 else torch.float32
        rows = lm.chunk_rows(v, buf_dtype.itemsize) if grads else lm.FWD_ROWS
        chunks = lm.row_chunks(n, rows)
        buf = torch.empty(chunks[0][1], v, device=dev, dtype=buf_dtype) if grads and chunks else None
        inv_t = 1.0 / cfg["temperature"]
        has_ent = cfg["entropy_coef"] != 0
        block = 1024
        for i, (r0, r1) in enumerate(chunks):
            sl = slice(r0, r1)
            save = buf[:r1 - r0] if grads else None
            saved = lm.forward_stats(hidden[sl], weight, targets[sl], inv_t, lse[sl], logp[sl], ent[sl], save=save)
            _token_kernel[(triton.cdiv(r1 - r0, block),)](
                logp[sl], ent[sl], logp[sl] if old is None else old[sl], logp[sl] if ref is None else ref[sl],
                adv[sl], mask[sl], scale[sl],
                loss_tok[sl], c_lp[sl], c_ent[sl], pg_tok[sl], kl_tok[sl], r1 - r0,
                cfg["clip_low"], cfg["clip_high"], cfg["clip_c"], cfg["kl_coef"], cfg["entropy_coef"],
                HAS_REF=ref is not None, KL_KIND=cfg["kl_kind"], BLOCK=block)
            if grads:
                d = lm.dlogits_from_saved(save, *saved, targets[sl], lse[sl], ent[sl], c_lp[sl], c_ent[sl], inv_t,
                                          has_ent=has_ent)
                lm.accumulate_grads(d, hidden[sl], weight, None if d_hidden is None else d_hidden[sl], d_weight,
                                    first=i == 0)
        ctx.grads = (d_hidden, d_weight)
        ctx.mark_non_differentiable(logp, ent, pg_tok, kl_tok)
        return loss_tok.sum(), logp, ent, pg_tok, kl_tok

    @staticmethod
    def backward(ctx, g_loss, *_):
        d_hidden, d_weight = ctx.grads
        ctx.grads = None  # hand the buffers to autograd without another reference (no copy into .grad)
        for g in (d_hidden, d_weight):
            if g is not None:
                g.mul_(g_loss)  # sync-free; callers often scale the loss (data-parallel size)
        return d_hidden, d_weight, *([None] * 9)


def _per_token(x, n, name):
    if x.shape != (n,):
        raise ValueError(f"fused_grpo_loss: {name} must have shape ({n},) like targets, got {tuple(x.shape)}")
    return x.detach().float().contiguous()


def fused_grpo_loss(hidden, weight, targets, *, old_logp, advantages, mask, scale=None, ref_logp=None,
                    clip_low=0.2, clip_high=0.2, clip_c=3.0, kl_coef=0.0, kl_kind="low_var_kl", entropy_coef=0.0,
                    temperature=1.0):
    """GRPO loss of N response tokens from hidden states and the LM head, with its gradients in the same pass.

    Per token t, with logp_t and H_t the log-prob and entropy of targets[t] under softmax(hidden @ weight.T / T):
        ratio = exp(clamp(logp - old, -20, 20))
        pg    = max(-A * ratio, -A * clamp(ratio, 1 - clip_low, 1 + clip_high)), then min(pg, -A * clip_c) if A < 0
        kl    = kl_penalty(logp, ref, kl_kind) (as grpo.loss.kl_penalty; 0 without ref_logp)
        loss  = sum_t mask_t * scale_t * (pg_t + kl_coef * kl_t - entropy_coef * H_t)
    Gradients are torch autograd's of that formula (clamps pass the gradient on their closed interval; ties of
    max/min split it evenly). Tokens with mask 0 contribute nothing, even if their inputs are NaN.

    Args:
        hidden: [N, H] bfloat16 or float32, CUDA (CPU only under TRITON_INTERPRET=1); one row per response token.
        weight: [V, H] LM head, same dtype.
        targets: [N] int64/int32 sampled token ids.
        old_logp, advantages, mask: [N] (treated as constants; mask may be bool or float). old_logp None: the
            policy that sampled is this one (one optimizer step per batch): old = this pass's logp, ratio 1.
        scale: the loss aggregation constant: a float, 0-dim tensor or [N] tensor multiplying each token's loss.
            None means token-mean over the local mask, 1 / max(sum(mask), 1). For verl's modes with global
            counts (gradient accumulation, data parallelism) use `token_weights(...)`, flattened like the tokens.
        ref_logp: [N] reference log-probs, or None (then kl_coef must be 0).
        clip_low, clip_high, clip_c: ratio clip range and dual-clip bound (clip_c > 1).
        kl_coef, kl_kind: KL weight and estimator ("k1"/"kl", "abs", "k2"/"mse", "k3"/"low_var_kl").
        entropy_coef: weight of the entropy bonus (subtracted).
        temperature: positive float dividing the logits.

    Returns:
        (loss, stats). loss: 0-dim float32, differentiable w.r.t. `hidden` and `weight`; the gradients are computed
        during this call (when autograd needs them) and scaled by the upstream gradient in backward. stats
        (detached): "logp", "entropy", "pg", "kl" per token [N] float32; "pg_loss", "kl_loss", "entropy_loss" (each
        term aggregated like the loss); "clipfrac", "clipfrac_lower", "approx_kl" (masked means over the local mask,
        as grpo.loss.policy_loss reports them).
    """
    name = "fused_grpo_loss"
    lm.check_lm_inputs(hidden, weight, targets, temperature, name=name)
    n = hidden.shape[0]
    if not clip_c > 1:
        raise ValueError(f"{name}: clip_c must be > 1, got {clip_c}")
    if kl_kind not in KL_KINDS:
        raise ValueError(f"{name}: unknown kl_kind {kl_kind!r}; valid kinds: {', '.join(KL_KINDS)}")
    if ref_logp is None and kl_coef != 0:
        raise ValueError(f"{name}: kl_coef={kl_coef} needs ref_logp; pass the reference log-probs or kl_coef=0")
    old = None if old_logp is None else _per_token(old_logp, n, "old_logp")
    adv = _per_token(advantages, n, "advantages")
    m = _per_token(mask, n, "mask")
    ref = None if ref_logp is None else _per_token(ref_logp, n, "ref_logp")
    if scale is None:
        scale = 1.0 / m.sum().clamp(min=1.0)
    if isinstance(scale, torch.Tensor):
        if scale.dim() == 0:
            scale = scale.detach().float().expand(n)
        scale = _per_token(scale.to(hidden.device), n, "scale")
    else:
        scale = torch.full((n,), float(scale), device=hidden.device, dtype=torch.float32)
    lm.check_device(hidden, adv, m, scale, *(t for t in (old, ref) if t is not None), name=name)
    cfg = dict(clip_low=float(clip_low), clip_high=float(clip_high), clip_c=float(clip_c), kl_coef=float(kl_coef),
               kl_kind=KL_KINDS[kl_kind], entropy_coef=float(entropy_coef), temperature=float(temperature))
    grad_on = torch.is_grad_enabled()
    hidden, weight = hidden.contiguous(), weight.contiguous()
    loss, logp, ent, pg, kl = _FusedGRPOLoss.apply(
        hidden, weight, targets.contiguous(), old, ref, adv, m, scale, cfg,
        grad_on and hidden.requires_grad, grad_on and weight.requires_grad)
    with torch.no_grad():
        active = m != 0
        w = torch.where(active, m * scale, 0.0)
        zero = torch.zeros((), device=hidden.device)
        count = active.sum().clamp(min=1)
        neg_kl = torch.zeros_like(logp) if old is None else (logp - old).clamp(-20.0, 20.0)
        ratio = torch.exp(neg_kl)
        l1, l2 = -adv * ratio, -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
        clipped = torch.maximum(l1, l2)
        stats = {
            "logp": logp, "entropy": ent, "pg": pg, "kl": kl,
            "pg_loss": torch.where(active, pg * w, zero).sum(),
            "kl_loss": torch.where(active, kl * w, zero).sum(),
            "entropy_loss": torch.where(active, ent * w, zero).sum(),
            "clipfrac": ((l2 > l1) & active).sum() / count,
            "clipfrac_lower": ((clipped > -adv * clip_c) & (adv < 0) & active).sum() / count,
            "approx_kl": torch.where(active, -neg_kl, zero).sum() / count,
        }
    return loss, stats


def token_weights(mask_BT, agg, *, num_tokens=None, num_seqs=None, max_len=None):
    """Per-token `scale` for fused_grpo_loss that reproduces grpo.loss.agg_loss's modes (verl's names).

    Args:
        mask_BT: [B, T] response mask.
        agg: "token-mean" (1 / num_tokens), "seq-mean-token-sum" (1 / num_seqs), "seq-mean-token-mean"
            (1 / ((sum_t mask + 1e-8) * num_seqs)), "seq-mean-token-sum-norm" (1 / (max_len * num_seqs)).
        num_tokens, num_seqs, max_len: global normalisers (numbers or 0-dim tensors); default sum(mask) clamped
            to >= 1, B and T.

    Returns:
        [B, T] float32 weights (flatten them in the same order as the tokens passed to fused_grpo_loss).
    """
    if agg not in AGG_MODES:
        raise ValueError(f"unknown loss aggregation {agg!r}; valid modes: {', '.join(AGG_MODES)}")
    if mask_BT.dim() != 2:
        raise ValueError(f"mask_BT must be [B, T], got shape {tuple(mask_BT.shape)}")
    m = mask_BT.float()
    b, t = m.shape
    seqs = b if num_seqs is None else num_seqs
    ones = torch.ones_like(m)
    if agg == "token-mean":
        return ones / (m.sum().clamp(min=1) if num_tokens is None else num_tokens)
    if agg == "seq-mean-token-sum":
        return ones / seqs
    if agg == "seq-mean-token-mean":
        return ones / ((m.sum(-1, keepdim=True) + 1e-8) * seqs)
    return ones / ((t if max_len is None else max_len) * seqs)
