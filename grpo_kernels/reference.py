"""Plain-torch reference implementations; the ground truth for the Triton kernels."""

import torch

# Rows of `hidden` processed per step in fused_logprob_ref; module-level so tests can shrink it.
CHUNK = 4096


def fused_logprob_ref(hidden, weight, targets, *, temperature=1.0, return_entropy=False):
    """Log-probabilities of `targets` under logits ``hidden @ weight.T / temperature``.

    Args:
        hidden: [N, H] float tensor (any float dtype; upcast to float32).
        weight: [V, H] float tensor (the LM head; upcast to float32).
        targets: [N] int64 token ids.
        temperature: positive float dividing the logits.
        return_entropy: also return the entropy of each row's distribution.

    Returns:
        logp [N] float32, or a tuple (logp, entropy) of [N] float32 tensors when
        `return_entropy`. Differentiable w.r.t. `hidden` and `weight`.

    Rows are processed CHUNK at a time to bound the forward temporaries; under
    autograd each chunk's logits are still saved for backward.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"expected hidden [N, H] and weight [V, H], got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if targets.shape != (hidden.shape[0],):
        raise ValueError(f"expected targets of shape ({hidden.shape[0]},), got {tuple(targets.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")

    n = hidden.shape[0]
    w = weight.float()
    logps, ents = [], []
    # max(n, 1) so that n == 0 still runs once and yields correctly shaped empty outputs.
    for start in range(0, max(n, 1), CHUNK):
        z = hidden[start:start + CHUNK].float() @ w.T
        if temperature != 1.0:
            z = z / temperature
        lse = torch.logsumexp(z, dim=-1)
        tgt = targets[start:start + CHUNK].long().unsqueeze(-1)
        logps.append(z.gather(-1, tgt).squeeze(-1) - lse)
        if return_entropy:
            ents.append(lse - (torch.softmax(z, dim=-1) * z).sum(-1))
    logp = torch.cat(logps)
    return (logp, torch.cat(ents)) if return_entropy else logp


def group_advantage_ref(rewards, group_size, *, eps=1e-6, norm_by_std=True, leave_one_out=False):
    """Group-relative advantages (GRPO / Dr.GRPO / RLOO-style baselines).

    Args:
        rewards: [B * n] tensor laid out group after group (group i is
            ``rewards[i*n:(i+1)*n]``, n = `group_size`).
        group_size: members per group, >= 1.
        eps: added to the group std before dividing.
        norm_by_std: divide by (std + eps) with unbiased std (GRPO); False gives
            plain centring (Dr.GRPO).
        leave_one_out: RLOO: the baseline of member j is the mean of the other n-1 members, not divided by the
            group std (verl's `rloo` estimator); with `norm_by_std` it is a ValueError (pass norm_by_std=False).

    Returns:
        [B * n] float32 advantages. A group of one uses mean 0 and std 1 (as verl
        does); with `leave_one_out` its baseline is 0.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D, got shape {tuple(rewards.shape)}")
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be an int >= 1, got {group_size!r}")
    if rewards.numel() % group_size != 0:
        raise ValueError(f"len(rewards)={rewards.numel()} is not divisible by group_size={group_size}")
    check_advantage_modes(norm_by_std=norm_by_std, leave_one_out=leave_one_out)

    # float64 keeps constant groups exactly zero (sum of n equal float32 values is exact).
    r = rewards.detach().double().view(-1, group_size)
    n = group_size
    if n == 1:
        baseline = torch.zeros_like(r)
        std = torch.ones_like(r[:, :1])
    else:
        total = r.sum(dim=1, keepdim=True)
        baseline = (total - r) / (n - 1) if leave_one_out else total / n
        std = r.std(dim=1, keepdim=True, unbiased=True)
    adv = r - baseline
    if norm_by_std:
        adv = adv / (std + eps)
    return adv.reshape(-1).float()


def check_advantage_modes(*, norm_by_std: bool, leave_one_out: bool) -> None:
    """Leave-one-out baselines are RLOO, which verl never divides by the group std (`compute_rloo_outcome_advantage`);
    the mixed estimator is nobody's, so it is refused rather than silently computed or silently changed."""
    if norm_by_std and leave_one_out:
        raise ValueError("leave_one_out=True (RLOO) is not divided by the group std, as verl's rloo estimator: "
                         "pass norm_by_std=False with it")
