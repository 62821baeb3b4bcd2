"""The GRPO loop, run by every rank of the job. Trainer rank 0 also drives: it draws prompts, scores responses and
writes the run folder.

One step:
  1. prompts go out to the rollout ranks, completions come back (object collectives on a gloo group);
  2. rewards and group advantages;
  3. every trainer rank takes its share of the rows: old and reference log-probs, then per mini-batch the clipped
     surrogate + KL loss, backward, grad-norm clip, optimizer step;
  4. the new weights go to the engines (grpo.weight_sync), metrics are written.
"""

from __future__ import annotations

import faulthandler
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

import grpo_kernels
from grpo_kernels import group_advantage_ref
from grpo import checkpoint, runlog, stop
from grpo.batch import Batch, make_batch, split_by_tokens
from grpo.config import Config, derive
from grpo.export import export_hf
from grpo.loss import agg_loss, kl_penalty, policy_loss
from grpo.policy import (CausalLMPolicy, MergedAdapters, build_lm, build_optimizer, build_policy, build_reference,
                         sync_named_tensors)
from grpo.rollout import NativeEngine
from grpo.tiny import save_tokenizer
from grpo.prompts import load_tokenizer, make_source, special_ids
from grpo.weight_sync import CudaIpcGroup, StatelessGroup, WeightReceiver, WeightSender


@dataclass(frozen=True)
class Roles:
    trainers: list[int]  # global ranks; trainers[0] drives
    rollouts: list[int]
    device: str  # "cpu" or "cuda"
    shared_gpu: bool = False  # trainer and engine processes on one GPU: NCCL refuses two ranks on one device
    tp: int = 1  # GPUs per engine: rollout ranks form engines of `tp` consecutive ranks inside a node

    @property
    def engine_leaders(self) -> list[int]:
        """The first rollout rank of each engine: it runs the engine and takes that engine's share of prompts."""
        return self.rollouts[::self.tp]


@dataclass
class Groups:
    ctrl: object  # every rank, gloo: prompts and completions as Python objects
    train: object  # trainer ranks: the FSDP2 mesh
    train_obj: object  # trainer ranks, gloo: the batch as an object
    sync: object  # trainer 0 + rollout ranks: the weight broadcast


def make_groups(roles: Roles) -> Groups:
    """Every rank creates every group, in the same order (torch.distributed requires it)."""
    cpu = roles.device == "cpu"
    ctrl = dist.group.WORLD if cpu else dist.new_group(backend="gloo")
    train = dist.new_group(roles.trainers)
    train_obj = train if cpu else dist.new_group(roles.trainers, backend="gloo")
    sync = dist.new_group([roles.trainers[0], *roles.rollouts], backend="gloo" if roles.shared_gpu else None)
    if roles.shared_gpu and roles.device == "cuda":  # NCCL refuses two ranks on one GPU; gloo would go via the host
        sync = CudaIpcGroup(sync, src=roles.trainers[0])
    return Groups(ctrl, train, train_obj, sync)


def run(cfg: Config, roles: Roles, run_dir: str, *, deadline: float | None = None) -> str:
    """Returns "done", or "requeue"/"stop" when a signal ended the run early (after a checkpoint).

    Slurm sends USR2 before the time limit or on preemption (then the job should be requeued) and TERM when it
    is cancelled or requeued by someone else; either way the ranks agree at the next step boundary, save, stop.
    """
    stop.install()
    stop.set_deadline(deadline)
    if TRACE:  # every rank's Python stacks every 60 s: where a hung job waits
        faulthandler.dump_traceback_later(60, repeat=True, file=sys.stderr)
    rank = dist.get_rank()
    groups = make_groups(roles)
    device = torch.device(roles.device)
    if rank in roles.trainers:
        status = Trainer(cfg, roles, groups, device, Path(run_dir)).run()
    else:
        status = rollout_worker(cfg, roles, groups, device)
    dist.barrier(group=groups.ctrl)
    return status


TRACE = os.environ.get("GRPO_TRACE") == "1"


def trace(msg: str) -> None:
    """With GRPO_TRACE=1 every rank logs where it is (to find the collective a hung job waits in)."""
    if TRACE:
        print(f"[grpo rank {dist.get_rank()} {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def agree_stop(group) -> str | None:
    """Once per step on every rank: has any rank been asked to stop? (A tiny all-reduce on the gloo group.)"""
    flag = torch.tensor([{None: 0, "stop": 1, "requeue": 2}[stop.requested()]])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return {0: None, 1: "stop", 2: "requeue"}[int(flag)]


def rollout_worker(cfg: Config, roles: Roles, groups: Groups, device: torch.device) -> str:
    """A rollout rank: an engine (or, inside a TP group, a place held for the engine's workers), its share of each
    step's prompts, and the new weights after every optimizer step."""
    rank = dist.get_rank()
    leader = rank in roles.engine_leaders
    engine = make_engine(cfg, roles, device) if leader else None
    trace("engine built")
    specs, addr = broadcast_obj(None, roles.trainers[0], groups.ctrl)
    load = connect_engine(cfg, roles, groups, engine, specs, addr, device) if leader else (lambda: None)
    if cfg.rollout.engine == "native":  # vLLM's workers took part in the first sync inside connect_engine
        load()
    trace("first weights in")
    index = roles.engine_leaders.index(rank) if leader else None
    while True:
        halt = agree_stop(groups.ctrl)
        if halt:
            return halt
        msg = broadcast_obj(None, roles.trainers[0], groups.ctrl)
        if msg is None:
            return "done"
        prompts, seed = msg
        out = None
        if leader:
            mine = prompts[index::len(roles.engine_leaders)]
            t0 = time.perf_counter()
            groups_out = engine.generate(mine, cfg.rollout.n, seed=seed * 1000 + index)
            stats = {"generate_s": time.perf_counter() - t0}
            if cfg.rollout.engine == "native":  # vLLM's memory lives in its worker processes
                stats |= gpu_memory(device)
            out = (groups_out, stats)
        trace(f"step {seed}: generated")
        dist.gather_object(out, None, dst=roles.trainers[0], group=groups.ctrl)
        load()
        trace(f"step {seed}: weights in")


def make_engine(cfg: Config, roles: Roles, device: torch.device):
    """The engine of an engine leader: the native engine on its own GPU (or CPU), or vLLM over the `tp` GPUs of its
    group (vLLM starts its worker processes itself, on the devices this process shows it)."""
    pad_id, eos_id = special_ids(load_tokenizer(cfg))
    if cfg.rollout.engine == "native":
        eos_id = -1 if cfg.rollout.ignore_eos else eos_id  # -1 never matches a sampled id
        return NativeEngine(build_lm(cfg.model, cfg.train.seed, device=device), pad_id=pad_id, eos_id=eos_id,
                            max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature)
    from grpo.vllm_engine import VLLMEngine, VLLMSettings

    if device.type == "cuda":
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
        first = torch.cuda.current_device()
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(ids[first:first + roles.tp])
    r = cfg.rollout
    settings = VLLMSettings(model_path=cfg.model.path, tensor_parallel=roles.tp, max_new_tokens=r.max_new_tokens,
                            temperature=r.temperature, max_model_len=cfg.data.max_prompt_len + r.max_new_tokens,
                            max_num_seqs=r.max_num_seqs, gpu_memory_utilization=r.gpu_memory_utilization,
                            dtype=cfg.model.dtype, seed=cfg.train.seed, ignore_eos=r.ignore_eos)
    return VLLMEngine(settings)


def connect_engine(cfg: Config, roles: Roles, groups: Groups, engine, specs, addr, device):
    """Join the weight sync; returns the function that takes one sync into the engine."""
    bucket_bytes = cfg.rollout.sync_bucket_mb << 20
    if cfg.rollout.engine != "native":
        index = roles.engine_leaders.index(dist.get_rank())
        engine.join_weight_sync(specs, host=addr[0], port=addr[1], rank_offset=1 + index * roles.tp,
                                world_size=1 + len(roles.rollouts), backend=sync_backend(roles),
                                bucket_bytes=bucket_bytes)
        engine.receive_weights()  # the first sync, which the trainer sends at start-up
        return engine.receive_weights
    receiver = WeightReceiver(specs, groups.sync, src=roles.trainers[0], bucket_bytes=bucket_bytes, device=device)
    # full fine-tuning sends every weight; LoRA sends the adapters (the base was loaded from the same checkpoint)
    if cfg.model.lora_rank:
        merged = MergedAdapters(engine.model)
        return lambda: merged.load(receiver.receive())
    return lambda: engine.load_weights(receiver.receive())


def sync_backend(roles: Roles) -> str:
    return "gloo" if roles.device == "cpu" or roles.shared_gpu else "nccl"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def broadcast_obj(obj, src: int, group):
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


class Trainer:
    def __init__(self, cfg: Config, roles: Roles, groups: Groups, device: torch.device, run_dir: Path):
        self.cfg, self.roles, self.groups, self.device, self.run_dir = cfg, roles, groups, device, run_dir
        self.rank = dist.get_rank()
        self.driver = self.rank == roles.trainers[0]
        self.dp = len(roles.trainers)
        mesh = DeviceMesh.from_group(groups.train, device_type=device.type)
        seed, t = cfg.train.seed, cfg.train
        self.policy = build_policy(cfg.model, mesh, seed=seed, trainable=True, device=device)
        self.ref = None
        if cfg.algo.kl_coef > 0:  # LoRA: the same model with its adapters off, no second copy
            self.ref = build_reference(cfg.model, self.policy, mesh, seed=seed, device=device)
        self.opt = build_optimizer(self.policy, cfg.model, lr=t.lr, weight_decay=t.weight_decay)
        for model in (self.policy, self.ref):
            if isinstance(model, CausalLMPolicy):
                model.kernel = cfg.algo.kernels
        self.fused = self.policy.fused_loss_available(device)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: min(1.0, (s + 1) / t.warmup_steps) if t.warmup_steps else 1.0)
        self.tok = load_tokenizer(cfg)
        self.source = make_source(cfg, self.tok) if self.driver else None
        self.start, self.bad_steps = 1, 0
        last = checkpoint.latest(run_dir)
        if last is not None:
            self.restore(checkpoint.load(last, self.policy, self.opt, group=groups.train))
        # LoRA: the native engine carries the adapters, vLLM takes merged weights (grpo.vllm_engine says why)
        named, static = sync_named_tensors(self.policy, merge_lora=cfg.rollout.engine == "vllm")
        self.sender = WeightSender(named, groups.sync, src=roles.trainers[0],
                                   bucket_bytes=cfg.rollout.sync_bucket_mb << 20,
                                   dtype=getattr(torch, cfg.model.dtype), static=static, device=device)
        addr = (socket.gethostname(), free_port()) if self.driver and cfg.rollout.engine != "native" else None
        broadcast_obj((self.sender.specs, addr) if self.driver else None, roles.trainers[0], groups.ctrl)
        if addr is not None:  # vLLM's workers live outside the job's world: a group of their own, rank 0 here
            self.sender.group = StatelessGroup(host=addr[0], port=addr[1], rank=0,
                                               world_size=1 + len(roles.rollouts), backend=sync_backend(roles))
        trace("policy built, sending the first weights")
        self.sender.send()
        trace("first weights sent")

    def advantage_fn(self):
        mode = self.cfg.algo.kernels
        if mode == "torch" or (mode == "auto" and not grpo_kernels.triton_available(self.device)):
            return group_advantage_ref
        return grpo_kernels.group_advantage

    def state(self) -> dict:
        """What the driver adds to a checkpoint: enough to continue as if never interrupted."""
        return {"sched": self.sched.state_dict(), "data": self.source.state_dict() if self.driver else None,
                "torch_rng": torch.get_rng_state(), "bad_steps": self.bad_steps}

    def restore(self, state: dict) -> None:
        self.sched.load_state_dict(state["sched"])
        torch.set_rng_state(state["torch_rng"])
        self.bad_steps = state["bad_steps"]
        self.start = state["step"] + 1
        if self.driver:
            self.source.load_state_dict(state["data"])
            runlog.truncate_metrics(self.run_dir, state["step"])
            print(f"resumed from {checkpoint.step_dir(self.run_dir, state['step'])}", flush=True)

    def save(self, step: int) -> None:
        checkpoint.save(self.run_dir, step, self.policy, self.opt, self.state(), group=self.groups.train,
                        is_leader=self.driver, keep=self.cfg.train.keep_checkpoints)

    def run(self) -> str:
        steps, every = self.cfg.train.steps, self.cfg.train.checkpoint_every
        for step in range(self.start, steps + 1):
            halt = agree_stop(self.groups.ctrl)
            if halt:
                if step - 1 >= self.start:  # else the checkpoint we resumed from is already the latest
                    self.save(step - 1)
                return halt
            t0 = time.perf_counter()
            batch, info = self.rollout(step)
            t1 = time.perf_counter()
            trace(f"step {step}: batch in")
            stats = self.update(batch)
            t2 = time.perf_counter()
            trace(f"step {step}: updated")
            self.sender.send()
            t3 = time.perf_counter()
            trace(f"step {step}: weights sent")
            if self.driver:
                row = {"step": step, **info, **{k: float(v) for k, v in stats.items()},
                       "lr": self.sched.get_last_lr()[0], "rollout_s": t1 - t0, "update_s": t2 - t1,
                       "sync_s": t3 - t2, "step_s": t3 - t0, **gpu_memory(self.device, prefix="trainer_")}
                runlog.append_metrics(self.run_dir, row)
            if step == steps or (every and step % every == 0):
                self.save(step)
        agree_stop(self.groups.ctrl)  # the rollout ranks' last check, then the end message
        broadcast_obj(None, self.roles.trainers[0], self.groups.ctrl)
        if self.cfg.train.export_hf:
            self.export()
        if self.driver:
            runlog.plot_rewards(self.run_dir)
        return "done"

    def export(self) -> None:
        """The trained policy as a Hugging Face folder (LoRA merged), with the tokenizer: what users load next."""
        out = export_hf(self.policy, self.run_dir / "hf", dtype=getattr(torch, self.cfg.model.dtype))
        if self.driver and self.cfg.model.path == "tiny":
            save_tokenizer(self.tok, out)
        elif self.driver:
            self.tok.save_pretrained(out)

    def rollout(self, step: int) -> tuple[Batch, dict]:
        """Driver: prompts out, completions back, rewards, advantages. Every trainer returns its rows."""
        cfg, groups, src = self.cfg, self.groups, self.roles.trainers[0]
        info = {}
        if self.driver:
            items = self.source.next_batch()
            prompt_ids = [x.prompt_ids for x in items]
            broadcast_obj((prompt_ids, step), src, groups.ctrl)
            gathered = [None] * dist.get_world_size()
            dist.gather_object(None, gathered, dst=src, group=groups.ctrl)
            groups_out = reassemble([gathered[r][0] for r in self.roles.engine_leaders], len(items))
            engines = [gathered[r][1] for r in self.roles.engine_leaders]
            info["generate_s"] = max(e["generate_s"] for e in engines)  # the slowest engine sets the pace
            if "gpu_peak_gib" in engines[0]:
                info["engine_peak_gib"] = max(e["gpu_peak_gib"] for e in engines)
            rewards = torch.tensor([x.score(self.source.response_text(c))
                                    for x, group in zip(items, groups_out) for c in group], dtype=torch.float32)
            adv = self.advantage_fn()(rewards.to(self.device), cfg.rollout.n, eps=cfg.algo.adv_eps,
                                      norm_by_std=cfg.algo.norm_adv_by_std,
                                      leave_one_out=cfg.algo.leave_one_out).cpu()
            batch = make_batch(prompt_ids, groups_out, adv, pad_id=special_ids(self.tok)[0])
            lengths = [len(c.token_ids) for group in groups_out for c in group]
            info |= {"reward": rewards.mean().item(), "reward_std": rewards.std().item(),
                     "response_len": sum(lengths) / len(lengths),
                     "stop_frac": sum(c.finish_reason == "stop" for g in groups_out for c in g) / len(lengths)}
        else:
            broadcast_obj(None, src, groups.ctrl)
            dist.gather_object(None, None, dst=src, group=groups.ctrl)
            batch = None
        if self.dp > 1:
            batch = broadcast_obj(batch, src, groups.train_obj)
        share = len(batch) // self.dp
        i = self.roles.trainers.index(self.rank)
        return batch.rows(i * share, (i + 1) * share).to(self.device), info

    @torch.no_grad()
    def logprobs(self, model, batch: Batch) -> torch.Tensor:
        """[S, L-1] log-probs under `model`, micro-batch by micro-batch (forward only)."""
        out = torch.zeros_like(batch.loss_mask)
        for idx in self.micro_batches(batch):
            mb = batch.select(idx).trim() if len(idx) else batch.rows(0, 1)  # empty: run for the collectives
            logp, _ = model(mb.input_ids, mb.attention_mask, mb.loss_mask, temperature=self.cfg.rollout.temperature)
            if len(idx):
                out[idx, :logp.shape[1]] = logp
        return out

    def micro_batches(self, batch: Batch) -> list[torch.Tensor]:
        """Row indices of each micro-batch; every trainer rank gets the same count (FSDP2's collectives must
        match), padding with empty micro-batches where a rank needs fewer."""
        lengths = batch.attention_mask.sum(1).tolist()
        groups = split_by_tokens(lengths, self.cfg.train.max_tokens_per_gpu)
        count = torch.tensor(len(groups))
        if self.dp > 1:
            dist.all_reduce(count, op=dist.ReduceOp.MAX, group=self.groups.train_obj)
        groups += [[]] * (int(count) - len(groups))
        return [torch.tensor(g, dtype=torch.long, device=batch.input_ids.device) for g in groups]

    def loss(self, mb: Batch, norm: dict):
        """The GRPO loss from per-token log-probs (grpo.loss, the reference numerics)."""
        algo = self.cfg.algo
        logp, entropy = self.policy(mb.input_ids, mb.attention_mask, mb.loss_mask,
                                    temperature=self.cfg.rollout.temperature)
        width = logp.shape[1]
        old = logp.detach() if mb.old_logp is None else mb.old_logp[:, :width]
        pg, metrics = policy_loss(logp, old, mb.advantages, mb.loss_mask, clip_low=algo.clip_low,
                                  clip_high=algo.clip_high, clip_c=algo.clip_c, agg=algo.agg, **norm)
        ent = agg_loss(entropy, mb.loss_mask, algo.agg, **norm)
        loss, kl = pg - algo.entropy_coef * ent, None
        if self.ref is not None:
            kl = agg_loss(kl_penalty(logp, mb.ref_logp[:, :width], algo.kl_kind), mb.loss_mask, algo.agg, **norm)
            loss = loss + algo.kl_coef * kl
        gap = ((logp.detach() - mb.rollout_logp[:, :width]).abs() * mb.loss_mask).sum()
        return loss, pg, ent, kl, {**metrics, "gap_sum": gap}

    def fused_loss(self, mb: Batch, norm: dict):
        """The same loss from grpo_kernels.fused_grpo_loss: three [tokens x hidden x vocab] matmuls instead of four, no
        [tokens, vocab] logits kept."""
        algo, width = self.cfg.algo, mb.loss_mask.shape[1]
        scale = grpo_kernels.token_weights(mb.loss_mask, algo.agg, **norm)
        old = None if mb.old_logp is None else mb.old_logp[:, :width]  # None: on-policy, ratio 1
        grpo = dict(old_logp=old, advantages=mb.advantages[:, None].expand(-1, width),
                    scale=scale, clip_low=algo.clip_low, clip_high=algo.clip_high, clip_c=algo.clip_c,
                    entropy_coef=algo.entropy_coef)
        if self.ref is not None:
            grpo.update(ref_logp=mb.ref_logp[:, :width], kl_coef=algo.kl_coef, kl_kind=algo.kl_kind)
        loss, stats = self.policy(mb.input_ids, mb.attention_mask, mb.loss_mask,
                                  temperature=self.cfg.rollout.temperature, grpo=grpo)
        metrics = {k: stats[k] for k in ("clipfrac", "clipfrac_lower", "approx_kl")}
        metrics["gap_sum"] = (stats["logp"] - mb.rollout_logp[:, :width][mb.loss_mask.bool()]).abs().sum()
        kl = stats["kl_loss"] if self.ref is not None else None
        return loss, stats["pg_loss"], stats["entropy_loss"], kl, metrics

    def update(self, batch: Batch) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        # One optimizer step per batch: the policy that sampled is the one being updated, so the old log-probs are
        # the update pass's own (ratio 1, as TRL does) and their separate forward pass is skipped.
        on_policy = cfg.train.mini_batches == 1
        batch.old_logp = None if on_policy else self.logprobs(self.policy, batch)
        if self.ref is not None:
            batch.ref_logp = self.logprobs(self.ref, batch)
        sums: dict[str, torch.Tensor] = {"skipped_steps": torch.zeros((), device=self.device)}
        add = lambda k, v: sums.__setitem__(k, sums.get(k, 0) + v.detach().float())
        size = derive(cfg, self.dp).mini_batch_rows
        for start in range(0, len(batch), size):
            mini = batch.rows(start, start + size)
            # token-mean over the mini-batch of every trainer rank; FSDP2 averages gradients over the dp ranks
            num_tokens = mini.loss_mask.sum()
            if self.dp > 1:
                dist.all_reduce(num_tokens, group=self.groups.train)
            norm = dict(num_tokens=num_tokens, num_seqs=len(mini) * self.dp, max_len=cfg.rollout.max_new_tokens)
            micro = self.micro_batches(mini)
            for j, idx in enumerate(micro):
                empty = len(idx) == 0
                mb = mini.rows(0, 1) if empty else mini.select(idx).trim()
                # deferring the reduce-scatter to the last micro-batch saves traffic but holds unsharded gradients
                self.policy.set_requires_gradient_sync(j == len(micro) - 1 or not cfg.train.defer_grad_sync)
                if self.fused:
                    loss, pg, ent, kl, metrics = self.fused_loss(mb, norm)
                else:
                    loss, pg, ent, kl, metrics = self.loss(mb, norm)
                if kl is not None:
                    add("kl", kl * (not empty))
                (loss * (self.dp * (not empty))).backward()
                share = mb.loss_mask.sum() / num_tokens * (not empty)  # this micro-batch's share of the tokens
                add("pg_loss", pg * (not empty))
                add("entropy", ent * (not empty))
                add("gap_sum", metrics.pop("gap_sum") * (not empty))
                for k, v in metrics.items():
                    add(k, v * share)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.train.grad_clip)
            if hasattr(grad_norm, "full_tensor"):
                grad_norm = grad_norm.full_tensor()
            # one host sync per optimizer step: the same verdict on every rank (the norm is global)
            if torch.isfinite(grad_norm).item():
                self.opt.step()
                self.bad_steps = 0
            else:
                self.bad_steps += 1
                add("skipped_steps", torch.full((), 1.0 / self.dp, device=self.device))
                if self.bad_steps >= cfg.train.max_bad_steps:
                    raise FloatingPointError(
                        f"{self.bad_steps} optimizer steps in a row had a non-finite loss or grad norm; "
                        "lower train.lr or check the data (train.max_bad_steps sets the limit)")
            self.sched.step()
            self.opt.zero_grad(set_to_none=True)
            add("grad_norm", grad_norm / self.dp)
        # trainer vs engine log-probs of the sampled tokens under the weights that sampled them
        gap_sum = sums.pop("gap_sum")
        gap = (gap_sum / batch.loss_mask.sum().clamp(min=1) if on_policy
               else masked_mean((batch.old_logp - batch.rollout_logp).abs(), batch.loss_mask))
        add("mismatch_abs", gap / self.dp)
        names = sorted(sums)
        stats = torch.stack([sums[k] for k in names])
        if self.dp > 1:
            dist.all_reduce(stats, group=self.groups.train)
        stats[[i for i, k in enumerate(names) if k not in ("mismatch_abs", "skipped_steps")]] /= cfg.train.mini_batches
        return dict(zip(names, stats))


def gpu_memory(device: torch.device, prefix: str = "") -> dict:
    """This process's peak GPU memory so far, GiB: what the caching allocator reserved and what tensors took (the
    memory model predicts the latter); nothing on the CPU."""
    if device.type != "cuda":
        return {}
    return {f"{prefix}gpu_peak_gib": torch.cuda.max_memory_reserved(device) / 2**30,
            f"{prefix}gpu_peak_alloc_gib": torch.cuda.max_memory_allocated(device) / 2**30}


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def reassemble(per_rank: list[list], num_prompts: int) -> list:
    """Engine k got prompts k, k+E, k+2E, ...; put their groups back in prompt order."""
    out = [None] * num_prompts
    for k, groups in enumerate(per_rank):
        for j, group in enumerate(groups):
            out[k + j * len(per_rank)] = group
    return out
