"""GRPO/PPO policy loss, KL penalties and loss aggregation (verl numerics)."""

import torch

KL_KINDS = ("kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3")
AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def _compute_dtype(t):
    # Half-precision inputs are upcast; float32/float64 are kept as they are.
    return torch.promote_types(t.dtype, torch.float32)


def _masked_mean(x, mask):
    return (x.masked_fill(mask == 0, 0.0) * mask).sum() / mask.sum().clamp(min=1)


def kl_penalty(logp, ref_logp, kind):
    """Per-token KL estimate between the policy and the reference policy.

    Args:
        logp: log-probs of the sampled tokens under the current policy.
        ref_logp: log-probs of the same tokens under the reference policy.
        kind: one of KL_KINDS: "k1"/"kl" (logp - ref), "abs" (|logp - ref|),
            "k2"/"mse" (0.5 * (logp - ref)^2), "k3"/"low_var_kl" (Schulman's
            low-variance estimator, clamped to [-10, 10]).

    Returns:
        Tensor of the same shape as `logp`.
    """
    if kind in ("kl", "k1"):
        return logp - ref_logp
    if kind == "abs":
        return (logp - ref_logp).abs()
    if kind in ("mse", "k2"):
        return 0.5 * (logp - ref_logp).square()
    if kind in ("low_var_kl", "k3"):
        kl = (ref_logp - logp).clamp(-20.0, 20.0)
        return (torch.exp(kl) - kl - 1).clamp(-10.0, 10.0)
    raise ValueError(f"unknown KL kind {kind!r}; valid kinds: {', '.join(KL_KINDS)}")


def agg_loss(loss_BT, mask_BT, agg, *, num_tokens=None, num_seqs=None, max_len=None):
    """Reduce a [B, T] per-token loss to a scalar.

    Args:
        loss_BT: [B, T] per-token loss.
        mask_BT: [B, T] mask (bool or float); masked-out entries are ignored
            even if they hold NaN/inf.
        agg: one of AGG_MODES:
            "token-mean": sum(l*m) / num_tokens;
            "seq-mean-token-sum": sum_b sum_t(l*m) / num_seqs;
            "seq-mean-token-mean": sum_b [sum_t(l*m) / (sum_t m + 1e-8)] / num_seqs;
            "seq-mean-token-sum-norm" (Dr.GRPO): sum(l*m) / max_len / num_seqs.
        num_tokens, num_seqs, max_len: optional global normalisers (numbers or
            scalar tensors) for data parallelism / gradient accumulation. When
            omitted they default to sum(m) (clamped to >= 1), B and T.

    Returns:
        Scalar tensor.
    """
    if agg not in AGG_MODES:
        raise ValueError(f"unknown loss aggregation {agg!r}; valid modes: {', '.join(AGG_MODES)}")
    if loss_BT.dim() != 2 or mask_BT.shape != loss_BT.shape:
        raise ValueError(
            f"expected loss and mask of the same [B, T] shape, got {tuple(loss_BT.shape)} and {tuple(mask_BT.shape)}"
        )
    for name, val in (("num_tokens", num_tokens), ("num_seqs", num_seqs), ("max_len", max_len)):
        if isinstance(val, (int, float)) and val <= 0:
            raise ValueError(f"{name} must be > 0, got {val}")

    mask = mask_BT.to(loss_BT.dtype)
    lm = loss_BT.masked_fill(mask == 0, 0.0) * mask
    B, T = loss_BT.shape
    seqs = B if num_seqs is None else num_seqs

    if agg == "token-mean":
        denom = mask.sum().clamp(min=1) if num_tokens is None else num_tokens
        return lm.sum() / denom
    if agg == "seq-mean-token-sum":
        return lm.sum() / seqs
    if agg == "seq-mean-token-mean":
        return (lm.sum(-1) / (mask.sum(-1) + 1e-8)).sum() / seqs
    return lm.sum() / (T if max_len is None else max_len) / seqs


def policy_loss(
    logp,
    old_logp,
    advantages,
    mask,
    *,
    clip_low=0.2,
    clip_high=0.2,
    clip_c=3.0,
    agg="token-mean",
    num_tokens=None,
    num_seqs=None,
    max_len=None,
):
    """Dual-clip PPO surrogate loss as used by verl's GRPO.

    Args:
        logp: [B, T] log-probs under the current policy (carries the gradient).
        old_logp: [B, T] log-probs under the behaviour policy (treated as constant).
        advantages: [B, T] or [B] (broadcast over T); treated as constant.
        mask: [B, T] response mask.
        clip_low, clip_high: ratio clip range [1 - clip_low, 1 + clip_high].
        clip_c: dual-clip bound for negative advantages; must be > 1.
        agg, num_tokens, num_seqs, max_len: passed to `agg_loss`.

    Returns:
        (loss, metrics): scalar loss and a dict of detached scalar tensors
        "clipfrac", "clipfrac_lower" and "approx_kl", all masked means over the
        local mask.
    """
    if not clip_c > 1:
        raise ValueError(f"clip_c must be > 1, got {clip_c}")
    if logp.dim() != 2 or old_logp.shape != logp.shape or mask.shape != logp.shape:
        raise ValueError(
            f"logp, old_logp and mask must share one [B, T] shape, got "
            f"{tuple(logp.shape)}, {tuple(old_logp.shape)}, {tuple(mask.shape)}"
        )
    if advantages.shape not in (logp.shape, logp.shape[:1]):
        raise ValueError(f"advantages must be [B, T] or [B] for {tuple(logp.shape)}, got {tuple(advantages.shape)}")

    dtype = _compute_dtype(logp)
    logp = logp.to(dtype)
    old_logp = old_logp.detach().to(dtype)
    adv = advantages.detach().to(dtype)
    if adv.dim() == 1:
        adv = adv.unsqueeze(-1).expand_as(logp)
    m = mask.to(dtype)

    neg_kl = (logp - old_logp).clamp(-20.0, 20.0)
    ratio = torch.exp(neg_kl)
    loss1 = -adv * ratio
    loss2 = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    clipped = torch.maximum(loss1, loss2)
    loss3 = -adv * clip_c
    neg = adv < 0
    per_token = torch.where(neg, torch.minimum(loss3, clipped), clipped)

    loss = agg_loss(per_token, m, agg, num_tokens=num_tokens, num_seqs=num_seqs, max_len=max_len)
    with torch.no_grad():
        metrics = {
            "clipfrac": _masked_mean((loss2 > loss1).to(dtype), m),
            "clipfrac_lower": _masked_mean(((clipped > loss3) & neg).to(dtype), m),
            # verl's ppo_kl: computed from the clamped log-ratio.
            "approx_kl": _masked_mean(-neg_kl, m),
        }
    return loss, metrics
