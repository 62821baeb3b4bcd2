"""The GRPO loop, run by every rank of the job. Trainer rank 0 also drives: it draws prompts, scores responses and
writes the run folder.

One step (`Trainer.step`):
  1. prompts go out to the engines, completions come back, rewards and group advantages (grpo.coordinator over
     grpo.channel);
  2. every trainer rank updates on its share of the rows (grpo.train_step);
  3. the new weights go to the engines (grpo.weight_sync), metrics are written.
With train.off_policy_steps=1 the engines generate the next batch while the trainers update on this one. In a
colocated layout (a trainer and an engine on each GPU) they take turns: the engine sleeps during the update, the
optimizer state leaves the GPU during generation.
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
from grpo import checkpoint, runlog, stop, tracking
from grpo.channel import Channel, End, Generate, Sync
from grpo.config import Config
from grpo.coordinator import Rollouts
from grpo.engine import KV_CACHE, WEIGHTS, Engine, NativeRollout, SyncLink
from grpo.export import export_hf, write_tokenizer
from grpo.offload import OptimizerSwap
from grpo.policy import CausalLMPolicy, build_lm, build_optimizer, build_policy, build_reference, sync_named_tensors
from grpo.prompts import load_tokenizer, make_source, special_ids
from grpo.rollout import NativeEngine
from grpo.schedule import build_scheduler
from grpo.train_step import Models, Ranks, train_step
from grpo.weight_sync import CudaIpcGroup, StatelessGroup, WeightSender
from grpo_kernels import group_advantage_ref


@dataclass(frozen=True)
class Roles:
    trainers: list[int]  # global ranks; trainers[0] drives
    rollouts: list[int]
    device: str  # "cpu" or "cuda"
    shared_gpu: bool = False  # trainer and engine processes on one GPU: NCCL refuses two ranks on one device
    tp: int = 1  # GPUs per engine: rollout ranks form engines of `tp` consecutive ranks inside a node
    time_share: bool = False  # colocated: the engine sleeps during the update
    swap_optimizer: bool = False  # time-shared: the optimizer state also leaves the GPU while the engine generates

    @property
    def engine_leaders(self) -> list[int]:
        """The first rollout rank of each engine: it runs the engine and takes that engine's share of prompts."""
        return self.rollouts[::self.tp]


@dataclass
class Groups:
    ctrl: object  # every rank, gloo: the control channel
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


def run(cfg: Config, roles: Roles, run_dir: str, *, deadline: float | None = None, make_engine=None) -> str:
    """Returns "done", or "requeue"/"stop" when a signal ended the run early (after a checkpoint).

    Slurm sends USR2 before the time limit or on preemption (then the job should be requeued) and TERM when it
    is cancelled or requeued by someone else; either way the ranks agree at the next step boundary, save, stop.
    `make_engine(cfg, roles, device) -> Engine` builds the engine of an engine leader (default: `make_engine`
    below; tests pass a stand-in).
    """
    stop.install()
    stop.set_deadline(deadline)
    if TRACE:  # every rank's Python stacks every 60 s: where a hung job waits
        faulthandler.dump_traceback_later(60, repeat=True, file=sys.stderr)
    rank = dist.get_rank()
    groups = make_groups(roles)
    channel = Channel(groups.ctrl, driver=roles.trainers[0], engine_leaders=roles.engine_leaders)
    device = torch.device(roles.device)
    if rank in roles.trainers:
        status = Trainer(cfg, roles, groups, channel, device, Path(run_dir)).run()
    else:
        status = rollout_worker(cfg, roles, groups, channel, device, make_engine or globals()["make_engine"])
    dist.barrier(group=groups.ctrl)
    return status


TRACE = os.environ.get("GRPO_TRACE") == "1"


def trace(msg: str) -> None:
    """With GRPO_TRACE=1 every rank logs where it is (to find the collective a hung job waits in)."""
    if TRACE:
        print(f"[grpo rank {dist.get_rank()} {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def rollout_worker(cfg: Config, roles: Roles, groups: Groups, channel: Channel, device: torch.device,
                   make_engine) -> str:
    """A rollout rank: an engine (or, inside a TP group, a place held for the engine's workers) that answers the
    driver's messages: generate its share of the prompts, take a weight sync, end."""
    rank = dist.get_rank()
    leader = rank in roles.engine_leaders
    engine: Engine | None = make_engine(cfg, roles, device) if leader else None
    trace("engine built")
    specs, addr = channel.broadcast(None, roles.trainers[0])
    if leader:
        engine.connect(sync_link(cfg, roles, groups, specs, addr, device))
    index = roles.engine_leaders.index(rank) if leader else None
    version = None  # optimizer updates behind the weights the engine holds
    while True:
        msg = channel.receive()
        if isinstance(msg, End):
            return msg.status
        if isinstance(msg, Sync):
            if leader:
                if roles.time_share:
                    engine.wake((WEIGHTS,))
                engine.receive_weights()
            version = msg.version
            trace(f"weights {version} in")
        elif isinstance(msg, Generate):
            out = None
            if leader:
                if roles.time_share:
                    engine.wake((KV_CACHE,))
                t0, wall0 = time.perf_counter(), time.time()
                # the temperature only when set: an engine without the argument still serves training
                extra = {} if msg.temperature is None else {"temperature": msg.temperature}
                groups_out = engine.generate(msg.prompts[index::len(roles.engine_leaders)], msg.n,
                                             seed=msg.seed * 1000 + index, **extra)
                stats = {"generate_s": time.perf_counter() - t0, "t0": wall0, "t1": time.time(),
                         "weights_version": version, **engine.memory_stats()}
                if roles.time_share:
                    engine.sleep()
                out = (groups_out, stats)
            channel.reply(out)
            trace(f"step {msg.seed}: generated")


def make_engine(cfg: Config, roles: Roles, device: torch.device) -> Engine:
    """The engine of an engine leader: the native engine on its own GPU (or CPU), or vLLM over the `tp` GPUs of its
    group (vLLM starts its worker processes itself, on the devices this process shows it)."""
    pad_id, eos_id = special_ids(load_tokenizer(cfg))
    if cfg.rollout.engine == "native":
        eos_id = -1 if cfg.rollout.ignore_eos else eos_id  # -1 never matches a sampled id
        return NativeRollout(NativeEngine(build_lm(cfg.model, cfg.train.seed, device=device), pad_id=pad_id,
                                          eos_id=eos_id, max_new_tokens=cfg.rollout.max_new_tokens,
                                          temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                                          top_k=cfg.rollout.top_k))
    from grpo.vllm_engine import VLLMEngine, VLLMSettings

    if device.type == "cuda":
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
        first = torch.cuda.current_device()
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(ids[first:first + roles.tp])
    r = cfg.rollout
    # full fine-tuning re-sends every weight: asleep, the engine can drop them; LoRA re-sends only the adapted ones
    sleep_level = (1 if cfg.model.lora_rank else 2) if roles.time_share else 0
    settings = VLLMSettings(model_path=cfg.model.path, tensor_parallel=roles.tp, max_new_tokens=r.max_new_tokens,
                            temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                            max_model_len=cfg.data.max_prompt_len + r.max_new_tokens,
                            max_num_seqs=r.max_num_seqs, gpu_memory_utilization=r.gpu_memory_utilization,
                            dtype=cfg.model.dtype, seed=cfg.train.seed, ignore_eos=r.ignore_eos,
                            sleep_level=sleep_level)
    return VLLMEngine(settings)


def sync_link(cfg: Config, roles: Roles, groups: Groups, specs, addr, device) -> SyncLink:
    """How the engine of this rollout rank joins the weight sync: the job's sync group, or (addr set: vLLM,
    whose workers live outside the job's world) a group of its own at addr."""
    common = dict(specs=specs, bucket_bytes=cfg.rollout.sync_bucket_mb << 20, device=device,
                  lora=bool(cfg.model.lora_rank) and cfg.rollout.engine == "native")
    if addr is None:
        return SyncLink(group=groups.sync, src=roles.trainers[0], **common)
    index = roles.engine_leaders.index(dist.get_rank())
    return SyncLink(host=addr[0], port=addr[1], rank_offset=1 + index * roles.tp, world_size=1 + len(roles.rollouts),
                    backend=sync_backend(roles), **common)


def sync_backend(roles: Roles) -> str:
    return "gloo" if roles.device == "cpu" or roles.shared_gpu else "nccl"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


class Trainer:
    def __init__(self, cfg: Config, roles: Roles, groups: Groups, channel: Channel, device: torch.device,
                 run_dir: Path):
        self.cfg, self.roles, self.groups, self.device, self.run_dir = cfg, roles, groups, device, run_dir
        self.rank = dist.get_rank()
        self.driver = self.rank == roles.trainers[0]
        self.ranks = Ranks(dp=len(roles.trainers), train=groups.train, obj=groups.train_obj)
        mesh = DeviceMesh.from_group(groups.train, device_type=device.type)
        seed, t = cfg.train.seed, cfg.train
        policy = build_policy(cfg.model, mesh, seed=seed, trainable=True, device=device)
        ref = None
        if cfg.algo.kl_coef > 0:  # LoRA: the same model with its adapters off, no second copy
            ref = build_reference(cfg.model, policy, mesh, seed=seed, device=device)
        opt = build_optimizer(policy, cfg.model, lr=t.lr, weight_decay=t.weight_decay)
        for model in (policy, ref):
            if isinstance(model, CausalLMPolicy):
                model.kernel = cfg.algo.kernels
        sched = build_scheduler(opt, t.warmup_steps)
        self.models = Models(policy, ref, opt, sched, fused=policy.fused_loss_available(device))
        self.swap = OptimizerSwap(opt) if roles.swap_optimizer else None
        self.tok = load_tokenizer(cfg)
        source = make_source(cfg, self.tok) if self.driver else None
        self.rollouts = Rollouts(cfg, channel, trainers=roles.trainers, source=source,
                                 pad_id=special_ids(self.tok)[0], device=device, advantage_fn=self.advantage_fn(),
                                 train_obj_group=groups.train_obj)
        self.start = 1
        state = checkpoint.load_latest(run_dir, policy, opt, group=groups.train, is_leader=self.driver)
        if state is not None:
            self.restore(state)
        elif self.driver:  # no checkpoint: rows of an earlier start would be written again
            runlog.truncate_metrics(run_dir, 0)
        # driver: TensorBoard / W&B / samples (grpo.tracking), and the validation prompts when train.val_every is on
        self.tracker = self.val_items = None
        if self.driver:
            # perf/throughput is per GPU: a GPU shared by a trainer and an engine counts once
            gpus = len(roles.trainers) if roles.shared_gpu else len(roles.trainers) + len(roles.rollouts)
            self.tracker = tracking.Tracker(run_dir, cfg, num_gpus=gpus, start=self.start)
            if cfg.train.val_every:
                self.val_items = source.validation_items(cfg)
        if cfg.train.val_every:  # every trainer rank takes part in each validation round: they need the count
            box = [len(self.val_items) if self.driver else None]
            dist.broadcast_object_list(box, src=roles.trainers[0], group=groups.train_obj)
            self.val_count = box[0]
        # LoRA: the native engine carries the adapters, vLLM takes merged weights (grpo.vllm_engine says why)
        named, static = sync_named_tensors(policy, merge_lora=cfg.rollout.engine == "vllm")
        self.sender = WeightSender(named, groups.sync, src=roles.trainers[0],
                                   bucket_bytes=cfg.rollout.sync_bucket_mb << 20,
                                   dtype=getattr(torch, cfg.model.dtype), static=static, device=device)
        addr = (socket.gethostname(), free_port()) if self.driver and cfg.rollout.engine != "native" else None
        channel.broadcast((self.sender.specs, addr) if self.driver else None, roles.trainers[0])
        if addr is not None:  # vLLM's workers live outside the job's world: a group of their own, rank 0 here
            self.sender.group = StatelessGroup(host=addr[0], port=addr[1], rank=0,
                                               world_size=1 + len(roles.rollouts), backend=sync_backend(roles))
        trace("policy built, sending the first weights")
        self.halt = self.sync(self.start - 1)
        trace("first weights sent")

    def advantage_fn(self):
        mode = self.cfg.algo.kernels
        if mode == "torch" or (mode == "auto" and not grpo_kernels.triton_available(self.device)):
            return group_advantage_ref
        return grpo_kernels.group_advantage

    def state(self) -> dict:
        """What the driver adds to a checkpoint: enough to continue as if never interrupted."""
        return {"sched": self.models.sched.state_dict(),
                "data": self.rollouts.data_state() if self.driver else None,
                "torch_rng": torch.get_rng_state(), "bad_steps": self.models.bad_steps}

    def restore(self, state: dict) -> None:
        self.models.sched.load_state_dict(state["sched"])
        torch.set_rng_state(state["torch_rng"])
        self.models.bad_steps = state["bad_steps"]
        self.start = state["step"] + 1
        if self.driver:
            self.rollouts.source.load_state_dict(state["data"])
            runlog.truncate_metrics(self.run_dir, state["step"])
            for name in (tracking.SAMPLES, tracking.VALIDATION):
                tracking.truncate_jsonl(self.run_dir / name, state["step"])
            print(f"resumed from {checkpoint.step_dir(self.run_dir, state['step'])}", flush=True)

    def save(self, step: int) -> None:
        if self.swap is not None:
            self.swap.reload()  # the checkpoint reads the optimizer state
        checkpoint.save(self.run_dir, step, self.models.policy, self.models.opt, self.state(),
                        group=self.groups.train, is_leader=self.driver, keep=self.cfg.train.keep_checkpoints)

    def sync(self, version: int) -> str | None:
        """Send the weights after `version` updates to the engines; returns the stop agreed in that round.
        Time-shared, the trainer gives the GPU back first (the engine wakes its weights to receive) and after (the
        sync's buckets, before the engine wakes its KV cache)."""
        if self.swap is not None:
            self.swap.offload()
        self.give_back_gpu()
        halt = self.rollouts.sync(version)
        self.sender.send()
        self.give_back_gpu()
        return halt

    def give_back_gpu(self) -> None:
        if self.roles.time_share and self.device.type == "cuda":
            torch.cuda.empty_cache()  # the allocator's cached blocks go back to the GPU, for the engine beside it

    def run(self) -> str:
        steps, every = self.cfg.train.steps, self.cfg.train.checkpoint_every
        ahead = self.cfg.train.off_policy_steps > 0
        pending = None  # off-policy: the next step's batch, already generated
        val_every = self.cfg.train.val_every
        if val_every and self.start == 1:  # the starting point, as verl's val_before_train
            self.validate(0)
        for step in range(self.start, steps + 1):
            if self.halt:
                if step - 1 >= self.start:  # else the checkpoint we resumed from is already the latest
                    self.save(step - 1)
                self.finish(self.halt)
                return self.halt
            row, pending = self.step(step, pending, look_ahead=ahead and step < steps)
            if self.driver:
                runlog.append_metrics(self.run_dir, row)
                self.tracker.log(row)
                self.tracker.log_samples(step, self.rollouts.samples)
            if val_every and (step % val_every == 0 or step == steps) and not self.halt:
                self.validate(step)  # the engines hold the weights after this step's update
            if step == steps or (every and step % every == 0):
                self.save(step)
        self.finish("done")
        if self.cfg.train.export_hf and self.export_fits():
            self.export()
        if self.driver:
            runlog.plot_rewards(self.run_dir)
        return "done"

    def validate(self, step: int) -> None:
        """Validation reward per data source with the weights after `step` updates (every trainer rank calls it)."""
        if self.swap is not None:
            self.swap.offload()  # colocated: the engine generates; no-op when the state is already off the GPU
        out = self.rollouts.validate(step, self.val_items, self.val_count)
        if self.driver:
            self.tracker.log_validation(out)
            print(f"validation after step {step}: reward {out['val/reward']:.3f}", flush=True)

    def finish(self, status: str) -> None:
        """End the control protocol, then close what the driver holds open."""
        self.rollouts.end(status)
        if self.driver:
            self.tracker.close()
            close = getattr(self.rollouts.source, "close", None)
            if close is not None:
                close()

    def step(self, step: int, pending, *, look_ahead: bool):
        """One GRPO step; returns its metrics row (driver) and, off-policy, the next step's batch."""
        t0 = time.perf_counter()
        if pending is None:
            self.rollouts.request(step)
            pending = self.rollouts.collect()
        batch, info = pending
        if look_ahead:  # the engines generate step + 1 with the weights they hold while this update runs
            self.rollouts.request(step + 1)
        t1, wall1 = time.perf_counter(), time.time()
        trace(f"step {step}: batch in")
        if self.swap is not None:
            self.swap.reload()
        lr = self.models.sched.get_last_lr()[0]  # the rate this step trains with (train_step steps the schedule)
        stats = train_step(self.models, batch, self.cfg, self.ranks)
        self.rollouts.trained()
        t2, wall2 = time.perf_counter(), time.time()
        used = device_used(self.device)  # the whole GPU as the update ends (colocated: the engine's share too)
        trace(f"step {step}: updated")
        pending = self.rollouts.collect() if look_ahead else None
        t3 = time.perf_counter()
        self.halt = self.sync(step)
        t4 = time.perf_counter()
        trace(f"step {step}: weights sent")
        row = None
        if self.driver:
            row = {"step": step, **info, **{k: float(v) for k, v in stats.items()},
                   "lr": lr, "rollout_s": t1 - t0, "update_s": t2 - t1,
                   "next_batch_wait_s": t3 - t2, "sync_s": t4 - t3, "step_s": t4 - t0,
                   "update_start_s": wall1, "update_end_s": wall2,  # wall clock: overlap checks across ranks
                   **used, **gpu_memory(self.device, prefix="trainer_")}
        return row, pending

    def export_fits(self) -> bool:
        """The driver's verdict (grpo.stop.end_fits, from its clock), the same on every trainer rank."""
        job, dtype = self.cfg.job, getattr(torch, self.cfg.model.dtype)
        nbytes = sum(p.numel() for p in self.models.policy.parameters()) * dtype.itemsize  # DTensor: global sizes
        fits = stop.end_fits(nbytes / (job.write_gbps * 1e9), job.signal_delay_s) if self.driver else None
        if self.ranks.dp > 1:
            box = [fits]
            dist.broadcast_object_list(box, src=self.roles.trainers[0], group=self.groups.train_obj)
            fits = box[0]
        if not fits and self.driver:
            print(f"export skipped: too little time left before the job's limit; write it later with "
                  f"`python -m grpo.export {self.run_dir}`", flush=True)
        return fits

    def export(self) -> None:
        """The trained policy as a Hugging Face folder (LoRA merged), with the tokenizer: what users load next."""
        out = export_hf(self.models.policy, self.run_dir / "hf", dtype=getattr(torch, self.cfg.model.dtype))
        if self.driver:
            write_tokenizer(self.cfg.model.path, out)


def device_used(device: torch.device) -> dict:
    if device.type != "cuda":
        return {}
    free, total = torch.cuda.mem_get_info(device)
    return {"update_device_used_gib": (total - free) / 2**30}


def gpu_memory(device: torch.device, prefix: str = "") -> dict:
    """This process's peak GPU memory so far, GiB: what the caching allocator reserved and what tensors took (the
    memory model predicts the latter); nothing on the CPU."""
    if device.type != "cuda":
        return {}
    return {f"{prefix}gpu_peak_gib": torch.cuda.max_memory_reserved(device) / 2**30,
            f"{prefix}gpu_peak_alloc_gib": torch.cuda.max_memory_allocated(device) / 2**30}
