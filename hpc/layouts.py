"""Layout candidates for a GPU job, each with its memory per GPU and its predicted step time (hpc.steptime).

Candidates:
- `split`: trainer GPUs (whole nodes when the job has several) and rollout GPUs with engines of TP GPUs inside a
  node, for every split and TP that fit; on-policy (one pool waits for the other) or, with train.off_policy_steps=1,
  one step off-policy (the engines generate batch k+1 during update k);
- `colocated`: every GPU holds a trainer rank and an engine's GPU, taking turns. Memory is the larger phase: during
  the update the engine sleeps (only its CUDA context stays) unless both fit awake; during generation the trainer
  keeps only its resident state (parameter shards, the reference, AdamW unless offloaded; gradients and activations
  are freed) and the engine gets what is left. With the engine asleep the planner may also swap the AdamW state to
  pinned host memory for generation (grpo.offload.OptimizerSwap): a larger KV cache, or a fit at all, for two PCIe
  copies a step.

Memory settings. `model.activation_checkpointing`, `model.optimizer_offload` and `model.param_offload` are None
(the planner decides), True (always) or False (never). For each candidate the planner tries every allowed
combination with the largest micro-batch budget that fits and keeps the fastest, so checkpointing and offload are
used only where memory needs them (they only ever cost time in the model). The chosen values travel in
Plan.settings and the ranks apply them (hpc.launch).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from dataclasses import dataclass, field

from grpo import hardware as hw
from grpo.config import Config, ConfigError
from hpc import memory, steptime
from hpc import plan as _plan  # seq_len, lora_targets, splits, MIN_ENGINE_SEQS (looked up at call time)
from hpc.models import LINEAR_NAMES, ModelShape
from hpc.steptime import Prediction, TrainSetup

HEADROOM = 0.95  # share of a card a plan may fill (allocator fragmentation)
BUCKET_GB = 1.0  # the sync's default bucket (rollout.sync_bucket_mb); two are in flight on each side
# trainer components that stay on the GPU between phases (the rest are freed after every update)
SLEEP_SLACK = 0.05  # share of the card left free beside a woken engine and the trainer's resident state
ADAM = ("AdamW states (fp32)", "AdamW states (adapters)")  # what the optimizer swap moves to the host
RESIDENT = ("parameters (fp32 shards)", "AdamW states (fp32)", "reference (bf16 shards)", "base weights (bf16, frozen)",
            "adapters + grads", "AdamW states (adapters)", "CUDA context")


@dataclass
class Candidate:
    prediction: Prediction
    tokens: int  # the trainer's micro-batch budget
    trainer: memory.Estimate  # the update phase's trainer
    engine: memory.Estimate  # one engine GPU while generating
    utilization: float  # the engine's share of its GPU (rollout.gpu_memory_utilization for this plan)
    engine_awake: bool = False  # colocated: both fit at once, the engine never sleeps
    swap_optimizer: bool = False  # colocated, asleep: the AdamW state goes to the host while the engine generates
    settings: dict = field(default_factory=dict)

    @property
    def total(self) -> float:
        return self.prediction.total


def reward_kind(cfg: Config) -> str:
    """Which reward the step-time model charges: toy tasks, or GSM8K / MATH by the first row's data_source of a
    jsonl file readable here, else by the file's name (MATH, the slower one, when neither says)."""
    if cfg.data.task != "dataset":
        return "toy"
    path = Path(cfg.data.train_path).expanduser()
    hint = str(path).lower()
    if path.suffix == ".jsonl" and path.is_file():
        with path.open() as f:
            try:
                hint = str(json.loads(f.readline()).get("data_source", hint)).lower()
            except (ValueError, AttributeError):
                pass
    return "gsm8k" if "gsm8k" in hint else "math"


def memory_options(cfg: Config) -> list[tuple[bool, bool, bool]]:
    """Allowed (activation checkpointing, optimizer offload, parameter offload), cheapest first. Parameter offload
    puts the AdamW state on the host too (FSDP2 CPUOffloadPolicy), so it implies optimizer offload."""
    m = cfg.model
    allowed = lambda v: [False, True] if v is None else [bool(v)]  # noqa: E731
    out = []
    for param in allowed(m.param_offload):
        for opt in ([True] if param else allowed(m.optimizer_offload)):
            if param and m.optimizer_offload is False:
                continue  # parameter offload cannot keep the optimizer state on the GPU
            out += [(ac, opt, param) for ac in allowed(m.activation_checkpointing)]
    return sorted(out, key=lambda o: (o[2], o[1], o[0]))


def trainer_estimate(cfg: Config, shape: ModelShape, gpus: int, tokens: int, option) -> memory.Estimate:
    ac, opt, param = option
    m = cfg.model
    return memory.trainer_memory(
        shape, gpus=gpus, tokens_per_micro_batch=tokens, lora_rank=m.lora_rank, param_offload=param,
        optimizer_offload=opt, activation_checkpointing=ac, reference=cfg.algo.kl_coef > 0,
        reference_offload=param, logprob="torch" if cfg.algo.kernels == "torch" else "fused",
        response_tokens=tokens * cfg.rollout.max_new_tokens // _plan.seq_len(cfg),
        defer_grad_sync=cfg.train.defer_grad_sync)


def engine_estimate(cfg: Config, shape: ModelShape, tp: int, card_gb: float, utilization: float):
    r = cfg.rollout
    lora = cfg.model.lora_rank if r.engine == "native" else 0  # vLLM takes merged weights: no adapters there
    return memory.rollout_memory(
        shape, tp=tp, card_gb=card_gb, utilization=utilization, seq_len=_plan.seq_len(cfg),
        max_num_seqs=r.max_num_seqs, lora_rank=lora,
        lora_base_copy=shape.linear_weights(_plan.lora_targets(cfg.model.lora_targets)) if lora else 0)


def sync_bytes(cfg: Config, shape: ModelShape) -> float:
    """bf16 bytes of one weight sync after the first (plan.sync_note says what travels)."""
    m = cfg.model
    if m.lora_rank and cfg.rollout.engine == "vllm":
        return 2.0 * shape.linear_weights(_plan.lora_targets(m.lora_targets))
    return 2.0 * (shape.lora_params(m.lora_rank) if m.lora_rank else shape.params)


def old_logprobs(cfg: Config) -> bool:
    """grpo.loop.update skips the old log-prob pass when the sampling policy is the one being updated."""
    return cfg.train.mini_batches > 1 or cfg.train.off_policy_steps > 0


def tp_options(cfg: Config, per_node: int) -> list[int]:
    r = cfg.rollout
    if r.engine == "native":  # the native engine runs on one GPU; tensor parallelism is vLLM's
        if r.tensor_parallel > 1:
            raise ConfigError(f"rollout.tensor_parallel={r.tensor_parallel} needs rollout.engine=vllm")
        return [1]
    if r.tensor_parallel:
        if per_node % r.tensor_parallel:
            raise ConfigError(f"rollout.tensor_parallel={r.tensor_parallel} must divide job.gpus_per_node="
                              f"{per_node}: an engine stays inside one node")
        return [r.tensor_parallel]
    return [t for t in (1, 2, 4, 8) if t <= per_node and per_node % t == 0]


class Search:
    """Everything a candidate's time and memory depend on, computed once per plan."""

    def __init__(self, cfg: Config, shape: ModelShape, *, nodes: int, per_node: int, host_gb: float):
        self.cfg, self.shape, self.nodes, self.per_node, self.host_gb = cfg, shape, nodes, per_node, host_gb
        self.total = nodes * per_node
        self.card = hw.gpu(cfg.job.gpu_type)
        self.card_gb = self.card.memory_gb
        self.seq_len = _plan.seq_len(cfg)
        self.responses = cfg.data.prompts_per_step * cfg.rollout.n
        m = cfg.model
        self.lora_layers = shape.layers * len(_plan.lora_targets(m.lora_targets) or LINEAR_NAMES) if m.lora_rank else 0
        # dataset rewards: reward.workers processes, by default one per CPU of the driver's task (at most 16)
        workers = cfg.reward.workers or max(1, min(16, cfg.job.cpus_per_task))
        self.reward = steptime.reward_s(self.responses, reward_kind(cfg), workers)
        self.need_seqs = min(cfg.rollout.max_num_seqs, _plan.MIN_ENGINE_SEQS)

    def generation(self, tp: int, engines: int, seqs: int) -> float:
        r = self.cfg.rollout
        return steptime.generation_s(self.shape, self.card, engine=r.engine, tp=tp, engines=engines,
                                     responses=self.responses, prompt_len=self.cfg.data.max_prompt_len,
                                     new_tokens=r.max_new_tokens, kv_seqs=seqs, samples_per_prompt=r.n)

    def train(self, gpus: int, tokens: int, option) -> tuple[float, float]:
        """(update, optimizer) seconds for `gpus` trainer ranks."""
        ac, opt, param = option
        setup = TrainSetup(gpus=gpus, nodes=math.ceil(gpus / self.per_node), tokens_per_micro_batch=tokens,
                           activation_checkpointing=ac, param_offload=param, optimizer_offload=opt,
                           lora_rank=self.cfg.model.lora_rank, lora_layers=self.lora_layers)
        t = self.cfg.train
        update = steptime.update_s(self.shape, self.card, setup, responses=self.responses, seq_len=self.seq_len,
                                   reference=self.cfg.algo.kl_coef > 0, old_logprobs=old_logprobs(self.cfg),
                                   mini_batches=t.mini_batches)
        return update, steptime.optimizer_s(self.shape, self.card, setup, mini_batches=t.mini_batches)

    def budgets(self):
        """Micro-batch token budgets to try, largest first, down to one full sequence."""
        tokens = self.cfg.train.max_tokens_per_gpu or self.seq_len * 8
        while tokens >= self.seq_len:
            yield tokens
            tokens //= 2

    def host_ok(self, est: memory.Estimate, gpus: int, extra: float = 0.0) -> bool:
        """Whether a node's host memory holds its GPUs' host parts (plus `extra` GB per GPU)."""
        return not self.host_gb or (est.host_total + extra) * min(gpus, self.per_node) <= self.host_gb * 0.9

    # ------------------------------------------------------------------------------------------------------ split

    def split(self, trainers: int, tp: int) -> list[Candidate]:
        """The on-policy and the off-policy candidate of one split, or none when it does not fit."""
        engine, seqs = engine_estimate(self.cfg, self.shape, tp, self.card_gb, self.cfg.rollout.gpu_memory_utilization)
        if seqs < self.need_seqs:
            return []
        fitting = []
        for option in memory_options(self.cfg):
            for tokens in self.budgets():
                est = trainer_estimate(self.cfg, self.shape, trainers, tokens, option)
                if est.gpu_total <= self.card_gb * HEADROOM and self.host_ok(est, trainers):
                    update, opt = self.train(trainers, tokens, option)
                    fitting.append((update + opt, option, (update, opt, option, tokens, est)))
                    break
        if not fitting:
            return []
        update, opt, option, tokens, est = fewest_savings(fitting)
        rollout_gpus = self.total - trainers
        engines = rollout_gpus // tp
        gen = self.generation(tp, engines, seqs)
        crosses = self.nodes > 1
        sync = steptime.sync_split_s(sync_bytes(self.cfg, self.shape), self.card, crosses_nodes=crosses)
        out = []
        for layout in ("split", "split off-policy"):
            pred = Prediction(layout=layout, trainers=trainers, rollout_gpus=rollout_gpus, tp=tp, engines=engines,
                              kv_seqs=seqs, generation=gen, reward=self.reward, update=update, optimizer=opt,
                              sync=sync)
            out.append(Candidate(pred, tokens, est, engine, self.cfg.rollout.gpu_memory_utilization,
                                 settings=settings(option)))
        return out

    def split_counts(self, tp: int) -> list[int]:
        job = self.cfg.job
        if job.trainer_ranks:
            counts = [job.trainer_ranks]
        elif self.nodes > 1:
            counts = [k * self.per_node for k in range(1, self.nodes)]
        else:
            counts = list(range(1, self.per_node))
        return [t for t in counts if 0 < t < self.total and (self.total - t) % tp == 0
                and _plan.splits(self.cfg, t)]

    # -------------------------------------------------------------------------------------------------- colocated

    def colocated(self, tp: int, options=None) -> list[Candidate]:
        if not _plan.splits(self.cfg, self.total):
            return []
        fitting = []
        for option in options or memory_options(self.cfg):
            for tokens in self.budgets():
                cand = self.colocated_fit(tp, tokens, option)
                if cand is not None:
                    fitting.append((cand.total, option, cand))
                    break
        return [fewest_savings(fitting)] if fitting else []

    def colocated_fit(self, tp: int, tokens: int, option) -> Candidate | None:
        """The faster of the engine awake beside the whole trainer (no sleep, a smaller KV cache; how the one-GPU
        loop ran when measured) and the engine asleep during the update, or None when neither fits."""
        est = trainer_estimate(self.cfg, self.shape, self.total, tokens, option)
        room = self.card_gb * HEADROOM
        if not self.host_ok(est, self.total) or est.gpu_total + memory.CUDA_CONTEXT_GB > room:
            return None
        util = self.cfg.rollout.gpu_memory_utilization
        resident = sum(v for k, v in est.gpu.items() if k in RESIDENT)
        update, opt = self.train(self.total, tokens, option)
        nbytes = sync_bytes(self.cfg, self.shape)
        sync = (steptime.sync_one_gpu_s(nbytes) if self.total == 1
                else steptime.sync_split_s(nbytes, self.card, crosses_nodes=self.nodes > 1))
        engines, best = self.total // tp, None
        free = self.cfg.rollout.free_cache_engine
        adam = sum(est.gpu.get(k, 0.0) for k in ADAM)
        variants = [(True, False)] if free is not True else []
        if free is not False:
            variants += [(False, False)] + ([(False, True)] if adam and self.host_ok(est, self.total, extra=adam)
                                            else [])
        for awake, swap_opt in variants:
            # asleep, the trainer's resident state is not all that stays: the sync buckets, the rollout process's own
            # CUDA context and the allocators' slack too (on an H200, an engine given all the rest failed to wake)
            kept = resident - (adam if swap_opt else 0.0)
            others = est.gpu_total if awake else (kept + 2 * BUCKET_GB + memory.CUDA_CONTEXT_GB
                                                 + SLEEP_SLACK * self.card_gb)
            share = min(util, (room - others) / self.card_gb)
            engine, seqs = engine_estimate(self.cfg, self.shape, tp, self.card_gb, share)
            weights_only = engine.gpu_total - engine.gpu.get("KV cache", 0)
            if seqs < self.need_seqs or (awake and est.gpu_total + engine.gpu_total > room) or (
                    kept + weights_only + 2 * BUCKET_GB > room):
                continue
            swap = 0.0 if awake else hw.ENGINE_WAKE_S[self.cfg.rollout.engine]
            if swap_opt:
                swap += steptime.optimizer_swap_s(adam, self.card)
            pred = Prediction(layout="colocated", trainers=self.total, rollout_gpus=self.total, tp=tp,
                              engines=engines, kv_seqs=seqs, generation=self.generation(tp, engines, seqs),
                              reward=self.reward, update=update, optimizer=opt, sync=sync, swap=swap)
            cand = Candidate(pred, tokens, est, engine, round(share, 3), engine_awake=awake,
                             swap_optimizer=swap_opt, settings=settings(option))
            # the swap only when it is worth its copies by the margin savings need (SAVINGS_MARGIN)
            if best is None or cand.total < best.total * (1 - SAVINGS_MARGIN if swap_opt else 1):
                best = cand
        return best

    def verl_seed(self) -> Candidate | None:
        """verl's seed settings for comparison: colocated, the largest TP inside a node, activation checkpointing,
        parameter and optimizer offload all on (the seeds switch every saving on)."""
        tp = max(tp_options(self.cfg, self.per_node))
        found = self.colocated(tp, options=[(True, True, True)])
        if found:
            found[0].prediction.layout_note = "all savings on, as verl's seeds"
        return found[0] if found else None

    # --------------------------------------------------------------------------------------------------- all

    def candidates(self) -> list[Candidate]:
        """Every candidate that fits memory, fastest first (both on- and off-policy splits; `choose` filters)."""
        out = []
        for tp in tp_options(self.cfg, self.per_node):
            out += self.colocated(tp)
            if self.total > 1:
                for t in self.split_counts(tp):
                    out += self.split(t, tp)
        return sorted(out, key=lambda c: c.total)


SAVINGS_MARGIN = 0.03  # a memory saving the planner need not use is taken only when it is predicted this much faster


def fewest_savings(fitting: list[tuple[float, tuple, object]]):
    """Of (seconds, option, item) that fit, the item with the fewest memory savings among those within
    SAVINGS_MARGIN of the fastest: savings are for memory, and the model's small gains from them (larger micro-
    batches) are within its error."""
    fastest = min(t for t, _, _ in fitting)
    near = [f for f in fitting if f[0] <= fastest * (1 + SAVINGS_MARGIN)]
    return min(near, key=lambda f: (f[1][2], f[1][1], f[1][0], f[0]))[2]


def settings(option) -> dict:
    ac, opt, param = option
    return {"model.activation_checkpointing": ac, "model.optimizer_offload": opt, "model.param_offload": param}


def eligible(cfg: Config, cand: Candidate, total: int) -> bool:
    """Whether a candidate runs what the config asks for (the layout, on- or off-policy, a fixed trainer count)."""
    job, off = cfg.job, cfg.train.off_policy_steps > 0
    kind = cand.prediction.layout
    if kind == "colocated":
        return job.layout in ("auto", "colocated") and not off and (job.layout == "colocated"
                                                                     or not job.trainer_ranks or total == 1)
    return job.layout in ("auto", "split") and (kind == "split off-policy") == off


def choose(cfg: Config, found: list[Candidate], total: int) -> tuple[Candidate, list[Candidate], list[str]]:
    """The fastest eligible candidate, the alternatives to print beside it (the best few, always the best
    colocated), and notes on what the config left out."""
    job, notes = cfg.job, []
    # job.layout=colocated with train.off_policy_steps=1 is refused earlier, in hpc.plan.check_config
    if job.layout == "split" and total == 1:
        raise ConfigError("job.layout=split needs at least 2 GPUs (job.gpus_per_node x job.nodes): one GPU runs "
                          "colocated")
    ok = [c for c in found if eligible(cfg, c, total)]
    if not ok:
        return None, found[:4], notes
    chosen = ok[0]
    rest = [c for c in found if c is not chosen]
    # the best of each layout first (so verl's colocated layout is always there), then the next fastest
    alternatives = []
    for kind in ("colocated", "split", "split off-policy"):
        best = next((c for c in rest if c.prediction.layout == kind), None)
        if best is not None:
            alternatives.append(best)
    alternatives += [c for c in rest if c not in alternatives][:max(0, 4 - len(alternatives))]
    alternatives.sort(key=lambda c: c.total)
    faster = next((c for c in found if c.total < chosen.total * 0.95), None)
    if faster is not None:
        kind = faster.prediction.layout
        how = {"colocated": "job.layout=colocated (job.trainer_ranks=0) with train.off_policy_steps=0",
               "split off-policy": "train.off_policy_steps=1",
               "split": "train.off_policy_steps=0"}[kind]
        notes.append(f"predicted faster: {faster.prediction.label} at {faster.total:.1f} s per step; set {how}")
    if job.trainer_ranks and job.layout == "colocated" and total > 1:
        notes.append(f"job.trainer_ranks={job.trainer_ranks} ignored: the colocated layout trains on every GPU")
    return chosen, alternatives, notes
