"""Log-probabilities (and entropy) of target tokens from hidden states and the LM head, in Triton."""

import torch

from . import _lm_head as lm


class _FusedLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, return_entropy):
        n = hidden.shape[0]
        lse, logp, ent = (torch.empty(n, device=hidden.device, dtype=torch.float32) for _ in range(3))
        inv_t = 1.0 / temperature
        for r0, r1 in lm.row_chunks(n, lm.FWD_ROWS):
            lm.forward_stats(hidden[r0:r1], weight, targets[r0:r1], inv_t, lse[r0:r1], logp[r0:r1], ent[r0:r1])
        ctx.save_for_backward(hidden, weight, targets, lse, ent)
        ctx.inv_t, ctx.return_entropy = inv_t, return_entropy
        if return_entropy:
            return logp, ent
        return logp

    @staticmethod
    def backward(ctx, g_logp, g_ent=None):
        hidden, weight, targets, lse, ent = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        n, v = hidden.shape[0], weight.shape[0]
        d_hidden = torch.empty_like(hidden) if need_h else None
        d_weight = (torch.zeros_like(weight) if n == 0 else torch.empty_like(weight)) if need_w else None
        if n == 0 or not (need_h or need_w):
            return d_hidden, d_weight, None, None, None
        zeros = None
        if g_logp is None or g_ent is None:
            zeros = torch.zeros(n, device=hidden.device, dtype=torch.float32)
        c_lp = zeros if g_logp is None else g_logp.float().contiguous()
        has_ent = ctx.return_entropy and g_ent is not None
        c_ent = g_ent.float().contiguous() if has_ent else zeros
        rows = lm.chunk_rows(v, hidden.element_size())
        chunks = lm.row_chunks(n, rows)
        buf = torch.empty(chunks[0][1], v, device=hidden.device, dtype=hidden.dtype)
        for i, (r0, r1) in enumerate(chunks):
            d = buf[:r1 - r0]
            h = hidden[r0:r1]
            lm.grad_logits(h, weight, targets[r0:r1], lse[r0:r1], ent[r0:r1], c_lp[r0:r1], c_ent[r0:r1], ctx.inv_t,
                           d, has_ent=has_ent)
            lm.accumulate_grads(d, h, weight, None if d_hidden is None else d_hidden[r0:r1], d_weight, first=i == 0)
        return d_hidden, d_weight, None, None, None


def fused_logprob(hidden, weight, targets, *, temperature=1.0, return_entropy=False):
    """Log-probabilities of `targets` under logits ``hidden @ weight.T / temperature``, never storing all logits.

    Args:
        hidden: [N, H] bfloat16 or float32 (CUDA; CPU only under TRITON_INTERPRET=1).
        weight: [V, H], the LM head, same dtype as `hidden`.
        targets: [N] int64 (or int32) token ids in [0, V); an id outside gives a NaN log-prob (not checked, so
            that the call needs no device sync).
        temperature: positive float dividing the logits.
        return_entropy: also return the entropy of each row's distribution.

    Returns:
        logp [N] float32, or (logp, entropy) [N] float32 when `return_entropy`. Differentiable w.r.t. `hidden`
        and `weight` (gradients in their dtype; bfloat16 matmuls accumulate in float32, and d_weight is summed
        over chunks of rows in its own dtype).

    Forward: one Triton pass (logits tiles with tl.dot, online logsumexp in the epilogue), extra memory
    O(N x V / 256) floats. Backward: per chunk of rows, a Triton pass recomputes the logits and writes
    dlogits ([chunk, V], at most `_lm_head.BUFFER_BYTES`), then two cuBLAS matmuls give d_hidden and d_weight.
    `grpo_kernels.fused_logprob_ref` is the plain torch version.
    """
    lm.check_lm_inputs(hidden, weight, targets, temperature, name="fused_logprob")
    return _FusedLogprob.apply(hidden.contiguous(), weight.contiguous(), targets.contiguous(), float(temperature),
                               bool(return_entropy))
