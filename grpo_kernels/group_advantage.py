"""Group-relative advantages (GRPO, Dr.GRPO, leave-one-out) in one Triton launch for the whole batch."""

import torch
import triton
import triton.language as tl

from . import _lm_head as lm
from .reference import check_advantage_modes


@triton.jit
def _group_adv_kernel(r_ptr, out_ptr, n_groups, eps, G: tl.constexpr, BG: tl.constexpr, BB: tl.constexpr,
                      NORM: tl.constexpr, LOO: tl.constexpr):
    groups = tl.program_id(0) * BB + tl.arange(0, BB)
    j = tl.arange(0, BG)
    ok = (groups < n_groups)[:, None] & (j < G)[None, :]
    off = groups.to(tl.int64)[:, None] * G + j[None, :]
    # float64: a constant group gives exactly zero (n equal float32 values sum exactly in 53 bits).
    r = tl.load(r_ptr + off, mask=ok, other=0.0).to(tl.float64)
    if G == 1:
        adv = r  # verl: a group of one has mean 0 and std 1
    else:
        total = tl.sum(r, axis=1)
        mean = total / G
        dev = tl.where(ok, r - mean[:, None], 0.0)
        std = tl.sqrt(tl.sum(dev * dev, axis=1) / (G - 1))
        if LOO:
            adv = r - (total[:, None] - r) / (G - 1)
        else:
            adv = dev
        if NORM:
            adv = adv / (std[:, None] + eps)
    if G == 1 and NORM:
        adv = adv / (1.0 + eps)
    tl.store(out_ptr + off, adv.to(tl.float32), mask=ok)


def group_advantage(rewards, group_size, *, eps=1e-6, norm_by_std=True, leave_one_out=False):
    """Group-relative advantages of rewards laid out group after group, in one Triton launch.

    Args:
        rewards: [B * n] tensor (CUDA; CPU only under TRITON_INTERPRET=1); group i is rewards[i*n:(i+1)*n].
        group_size: members per group n, an int >= 1.
        eps: added to the group std before dividing.
        norm_by_std: GRPO, (r - baseline) / (std + eps) with the unbiased std; False is Dr.GRPO (r - baseline).
        leave_one_out: RLOO: the baseline of member j is the mean of the other n - 1 members (else the group
            mean); verl's rloo never divides it by the std, so together with `norm_by_std` it is a ValueError.

    Returns:
        [B * n] float32 advantages. A group of one has mean 0 and std 1, as in verl (so its advantage is
        r / (1 + eps), or r without norm_by_std). Computed in float64; `grpo_kernels.group_advantage_ref` is the
        torch version.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D, got shape {tuple(rewards.shape)}")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
        raise ValueError(f"group_size must be an int >= 1, got {group_size!r}")
    if rewards.numel() % group_size != 0:
        raise ValueError(f"len(rewards)={rewards.numel()} is not divisible by group_size={group_size}")
    check_advantage_modes(norm_by_std=norm_by_std, leave_one_out=leave_one_out)
    lm.check_device(rewards, name="group_advantage")
    r = rewards.detach()
    if not r.is_floating_point():
        r = r.double()
    r = r.contiguous()
    out = torch.empty(r.numel(), device=r.device, dtype=torch.float32)
    n_groups = r.numel() // group_size
    if n_groups == 0:
        return out
    bg = triton.next_power_of_2(group_size)
    bb = max(1, min(64, 1024 // bg))
    _group_adv_kernel[(triton.cdiv(n_groups, bb),)](
        r, out, n_groups, float(eps), G=group_size, BG=bg, BB=bb, NORM=bool(norm_by_std), LOO=bool(leave_one_out))
    return out
