"""One GRPO update on a batch of scored responses: old and reference log-probs, then per mini-batch and micro-batch
the loss, backward, grad-norm clip and optimizer step. `train_step` is what the loop, the benchmarks and the tests
call; it reads nothing but its arguments.

The loss comes from one place (`token_loss`): the Triton kernel (`grpo_kernels.fused_grpo_loss`, three [tokens x
hidden x vocab] matmuls, no [tokens, vocab] logits kept) where it runs, else the torch reference numerics of
`grpo.loss`. Both compute the same formula (tests/unit/test_kernels_triton.py, tests/e2e).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

import grpo_kernels
from grpo.batch import Batch, pack_by_tokens, split_by_tokens
from grpo.config import Config, derive
from grpo.loss import agg_loss, kl_penalty, policy_loss


@dataclass
class Models:
    """What an update changes and reads: the policy, the frozen reference (None without a KL loss), the optimizer,
    the learning-rate schedule, and whether the fused loss kernel runs for this policy on this device."""

    policy: torch.nn.Module
    ref: torch.nn.Module | None
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    fused: bool = False
    bad_steps: int = 0  # optimizer steps in a row skipped for a non-finite grad norm


@dataclass(frozen=True)
class Ranks:
    """The trainer ranks' groups: `train` the FSDP2 mesh's group (sums on the device), `obj` its gloo twin."""

    dp: int = 1
    train: object = None
    obj: object = None


def train_step(models: Models, batch: Batch, cfg: Config, ranks: Ranks = Ranks()) -> dict[str, torch.Tensor]:
    """Update `models` on this trainer rank's rows of one GRPO batch. Returns the step's metrics (device scalars,
    summed over the trainer ranks), one value per name."""
    algo, train = cfg.algo, cfg.train
    device = batch.input_ids.device
    # One optimizer step per batch, sampled by the weights being updated: the old log-probs are the update pass's
    # own (ratio 1, as TRL does) and their separate forward pass is skipped. A batch sampled by older weights
    # (off-policy) needs them: the ratio's denominator is the policy before this update, not the sampler.
    on_policy = train.mini_batches == 1 and train.off_policy_steps == 0
    batch.old_logp = None if on_policy else logprobs(models.policy, batch, cfg, ranks)
    if models.ref is not None:
        batch.ref_logp = logprobs(models.ref, batch, cfg, ranks)
    sums: dict[str, torch.Tensor] = {"skipped_steps": torch.zeros((), device=device)}
    add = lambda k, v: sums.__setitem__(k, sums.get(k, 0) + v.detach().float())
    if batch.old_logp is not None:
        batch.advantages_tok = rollout_correction(batch, algo, train.off_policy_steps, add)
    size = derive(cfg, ranks.dp).mini_batch_rows
    for start in range(0, len(batch), size):
        mini = batch.rows(start, start + size)
        # token-mean over the mini-batch of every trainer rank; FSDP2 averages gradients over the dp ranks
        num_tokens = mini.loss_mask.sum()
        if ranks.dp > 1:
            dist.all_reduce(num_tokens, group=ranks.train)
        norm = dict(num_tokens=num_tokens, num_seqs=len(mini) * ranks.dp, max_len=cfg.rollout.max_new_tokens)
        micro = micro_batches(mini, cfg, ranks)
        for j, idx in enumerate(micro):
            empty = len(idx) == 0
            mb = mini.rows(0, 1) if empty else mini.select(idx).trim()
            # deferring the reduce-scatter to the last micro-batch saves traffic but holds unsharded gradients
            models.policy.set_requires_gradient_sync(j == len(micro) - 1 or not train.defer_grad_sync)
            loss, pg, ent, kl, metrics = token_loss(models, mb, cfg, norm)
            if kl is not None:
                add("kl", kl * (not empty))
            (loss * (ranks.dp * (not empty))).backward()
            share = mb.loss_mask.sum() / num_tokens * (not empty)  # this micro-batch's share of the tokens
            add("pg_loss", pg * (not empty))
            add("entropy", ent * (not empty))
            add("gap_sum", metrics.pop("gap_sum") * (not empty))
            for k, v in metrics.items():
                add(k, v * share)
        grad_norm = optimizer_step(models, train, ranks.dp)
        add("skipped_steps", (~torch.isfinite(grad_norm)).float() / ranks.dp)
        add("grad_norm", grad_norm / ranks.dp)
    models.sched.step()  # once per training step whatever the mini-batches, as verl (grpo.schedule)
    # trainer vs engine log-probs of the sampled tokens under the weights that sampled them
    gap_sum = sums.pop("gap_sum")
    # (off-policy, the old log-probs are one update newer than the sampler: the gap holds the staleness too)
    gap = (gap_sum / batch.loss_mask.sum().clamp(min=1) if batch.old_logp is None
           else masked_mean((batch.old_logp - batch.rollout_logp).abs(), batch.loss_mask))
    add("mismatch_abs", gap / ranks.dp)
    names = sorted(sums)
    stats = torch.stack([sums[k] for k in names])
    if ranks.dp > 1:
        dist.all_reduce(stats, group=ranks.train)
    per_batch = ("mismatch_abs", "skipped_steps") + tuple(k for k in names if k.startswith("rollout_is"))
    stats[[i for i, k in enumerate(names) if k not in per_batch]] /= train.mini_batches
    return dict(zip(names, stats))


def optimizer_step(models: Models, train, dp: int) -> torch.Tensor:
    """Clip, then step unless the global grad norm is not finite (counted; too many in a row abort the run)."""
    grad_norm = torch.nn.utils.clip_grad_norm_(models.policy.parameters(), train.grad_clip)
    if hasattr(grad_norm, "full_tensor"):
        grad_norm = grad_norm.full_tensor()
    # one host sync per optimizer step: the same verdict on every rank (the norm is global)
    if torch.isfinite(grad_norm).item():
        models.opt.step()
        models.bad_steps = 0
    else:
        models.bad_steps += 1
        if models.bad_steps >= train.max_bad_steps:
            raise FloatingPointError(
                f"{models.bad_steps} optimizer steps in a row had a non-finite loss or grad norm; "
                "lower train.lr or check the data (train.max_bad_steps sets the limit)")
    models.opt.zero_grad(set_to_none=True)
    return grad_norm


def rollout_correction(batch: Batch, algo, off_policy_steps: int, add) -> torch.Tensor | None:
    """verl's rollout correction for a batch the engines sampled with other weights than the trainer's old policy:
    each token's advantage times w = min(pi_old / pi_rollout, algo.rollout_is_threshold), per token or one per
    response (the product of its tokens' ratios). Folding w (> 0, no gradient) into the advantage multiplies the
    clipped surrogate, dual clip included, by w, and leaves the KL and entropy terms alone, as verl does. Logs the
    weights' mean, max and the share truncated. Returns None when the correction is off."""
    mode = algo.rollout_is if algo.rollout_is != "auto" else ("token" if off_policy_steps else "none")
    if mode == "none":
        return None
    mask = batch.loss_mask
    log_ratio = (batch.old_logp - batch.rollout_logp) * mask
    if mode == "sequence":
        log_ratio = log_ratio.sum(1, keepdim=True).expand_as(mask)
    raw = log_ratio.clamp(max=30.0).exp()
    weight = raw.clamp(max=algo.rollout_is_threshold)
    add("rollout_is_mean", masked_mean(weight, mask))
    add("rollout_is_max", (raw * mask).max())
    add("rollout_is_truncated", masked_mean((raw > algo.rollout_is_threshold).float(), mask))
    return batch.advantages[:, None] * weight


def token_advantages(mb: Batch, width: int) -> torch.Tensor:
    """[rows, width] per-token advantages: the response's, times the rollout-correction weight when there is one."""
    if mb.advantages_tok is not None:
        return mb.advantages_tok[:, :width]
    return mb.advantages[:, None].expand(-1, width)


def token_loss(models: Models, mb: Batch, cfg: Config, norm: dict):
    """(loss, pg_loss, entropy, kl or None, metrics) of one micro-batch: the fused kernel where it runs, else the
    torch reference. The one place that picks between them."""
    return (fused_loss if models.fused else reference_loss)(models, mb, cfg, norm)


def reference_loss(models: Models, mb: Batch, cfg: Config, norm: dict):
    """The GRPO loss from per-token log-probs (grpo.loss, the reference numerics)."""
    algo = cfg.algo
    logp, entropy = models.policy(mb.input_ids, mb.attention_mask, mb.loss_mask, temperature=cfg.rollout.temperature,
                                  pack=cfg.train.pack)
    width = logp.shape[1]
    old = logp.detach() if mb.old_logp is None else mb.old_logp[:, :width]
    adv = mb.advantages if mb.advantages_tok is None else token_advantages(mb, width)
    pg, metrics = policy_loss(logp, old, adv, mb.loss_mask, clip_low=algo.clip_low,
                              clip_high=algo.clip_high, clip_c=algo.clip_c, agg=algo.agg, **norm)
    ent = agg_loss(entropy, mb.loss_mask, algo.agg, **norm)
    loss, kl = pg - algo.entropy_coef * ent, None
    if models.ref is not None:
        kl = agg_loss(kl_penalty(logp, mb.ref_logp[:, :width], algo.kl_kind), mb.loss_mask, algo.agg, **norm)
        loss = loss + algo.kl_coef * kl
    gap = ((logp.detach() - mb.rollout_logp[:, :width]).abs() * mb.loss_mask).sum()
    return loss, pg, ent, kl, {**metrics, "gap_sum": gap}


def fused_loss(models: Models, mb: Batch, cfg: Config, norm: dict):
    """The same loss from grpo_kernels.fused_grpo_loss."""
    algo, width = cfg.algo, mb.loss_mask.shape[1]
    scale = grpo_kernels.token_weights(mb.loss_mask, algo.agg, **norm)
    old = None if mb.old_logp is None else mb.old_logp[:, :width]  # None: on-policy, ratio 1
    grpo = dict(old_logp=old, advantages=token_advantages(mb, width),
                scale=scale, clip_low=algo.clip_low, clip_high=algo.clip_high, clip_c=algo.clip_c,
                entropy_coef=algo.entropy_coef)
    if models.ref is not None:
        grpo.update(ref_logp=mb.ref_logp[:, :width], kl_coef=algo.kl_coef, kl_kind=algo.kl_kind)
    loss, stats = models.policy(mb.input_ids, mb.attention_mask, mb.loss_mask,
                                temperature=cfg.rollout.temperature, grpo=grpo, pack=cfg.train.pack)
    metrics = {k: stats[k] for k in ("clipfrac", "clipfrac_lower", "approx_kl")}
    metrics["gap_sum"] = (stats["logp"] - mb.rollout_logp[:, :width][mb.loss_mask.bool()]).abs().sum()
    kl = stats["kl_loss"] if models.ref is not None else None
    return loss, stats["pg_loss"], stats["entropy_loss"], kl, metrics


@torch.no_grad()
def logprobs(model, batch: Batch, cfg: Config, ranks: Ranks) -> torch.Tensor:
    """[S, L-1] log-probs under `model`, micro-batch by micro-batch (forward only)."""
    out = torch.zeros_like(batch.loss_mask)
    for idx in micro_batches(batch, cfg, ranks):
        mb = batch.select(idx).trim() if len(idx) else batch.rows(0, 1)  # empty: run for the collectives
        logp, _ = model(mb.input_ids, mb.attention_mask, mb.loss_mask, temperature=cfg.rollout.temperature,
                        pack=cfg.train.pack)
        if len(idx):
            out[idx, :logp.shape[1]] = logp
    return out


def micro_batches(batch: Batch, cfg: Config, ranks: Ranks) -> list[torch.Tensor]:
    """Row indices of each micro-batch; every trainer rank gets the same count (FSDP2's collectives must match).
    Packed (`train.pack`): the token budget counts real tokens and every rank splits its rows into the agreed count
    of micro-batches of even token counts. Padded: the budget counts rows x longest row, and a rank that needs fewer
    micro-batches runs empty ones."""
    lengths = batch.attention_mask.sum(1).tolist()
    budget = cfg.train.max_tokens_per_gpu
    if cfg.train.pack:
        count = 1
        while True:  # the same iterations on every rank: each ends on the all-reduced count
            groups = pack_by_tokens(lengths, budget, min_count=count)
            most = max_over_ranks(len(groups), ranks)
            if most == count:
                break
            count = most
    else:
        groups = split_by_tokens(lengths, budget)
        groups += [[]] * (max_over_ranks(len(groups), ranks) - len(groups))
    return [torch.tensor(g, dtype=torch.long, device=batch.input_ids.device) for g in groups]


def max_over_ranks(value: int, ranks: Ranks) -> int:
    """The largest `value` over the trainer ranks (a host int, over the gloo group)."""
    if ranks.dp == 1:
        return value
    t = torch.tensor(value)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=ranks.obj)
    return int(t)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)
