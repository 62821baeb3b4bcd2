"""Planning: from a config and the cluster to a partition, nodes, ranks, roles and per-GPU memory.

Split layout: ranks 0..T-1 train (rank 0 drives), ranks T..W-1 generate, one task per GPU; the rollout ranks form
engines of `tp` GPUs, each inside one node. Colocated layout: two tasks per GPU; on each node of N GPUs local ranks
0..N-1 train and N..2N-1 are their engines on the same GPUs. The layout, the split, the engines' tensor parallelism,
the memory savings and the trainer's micro-batch budget are the fastest that fit: hpc.layouts searches them with the
memory model (hpc.memory) and the step-time model (hpc.steptime).
"""

from __future__ import annotations

import re
import shutil
from dataclasses import asdict, dataclass, field

from grpo import hardware
from grpo.config import Config, ConfigError, copy_config, derive, validate
from grpo.tasks import TASKS
from hpc import layouts, memory, steptime
from hpc.models import LINEAR_NAMES, ModelShape, resolve_shape

GPU_MEMORY_GB = {name: spec.memory_gb for name, spec in hardware.GPUS.items()}


@dataclass(kw_only=True)
class Plan:
    executor: str  # "local" or "slurm"
    device: str  # "cpu" or "cuda"
    nodes: int
    tasks_per_node: int
    trainers: list[int]
    rollouts: list[int]
    notes: list[str] = field(default_factory=list)
    partition: str | None = None
    nodelist: list[str] = field(default_factory=list)  # nodes seen available when planning (shown, not pinned)
    exclude: list[str] = field(default_factory=list)  # nodes of the partition seen down, drained or failing
    gpu_type: str | None = None
    gres_typed: bool = True  # False: the nodes' GRES is untyped (gpu:8), so the job asks for gpu:N
    gpus_per_node: int = 0
    tp: int = 1
    tokens_per_micro_batch: int = 0
    memory_table: str = ""
    layout: str = "split"  # "split": trainer and rollout ranks on GPUs of their own; "colocated": they share each GPU
    # colocated: the engine sleeps during the update (it and the trainer do not fit the GPU together)
    time_share: bool = False
    swap_optimizer: bool = False  # time-shared: the optimizer state also leaves the GPU while the engine generates
    # what the planner chose for this plan, applied by every rank (apply_settings): model.activation_checkpointing,
    # model.optimizer_offload, model.param_offload, rollout.gpu_memory_utilization
    settings: dict = field(default_factory=dict)
    prediction: dict = field(default_factory=dict)  # the chosen layout's seconds per phase (hpc.steptime)
    alternatives: list[dict] = field(default_factory=list)  # other candidates: {"label": ..., phase: seconds}

    @property
    def world_size(self) -> int:
        return len(self.trainers) + len(self.rollouts)

    def to_dict(self) -> dict:
        return asdict(self)


def slurm_available() -> bool:
    return all(shutil.which(c) is not None for c in ("sbatch", "srun", "sinfo"))


def check_config(cfg: Config) -> None:
    """Reject combinations no run can satisfy, with a message that says what would work. The ranges of single
    fields and the text checks live in grpo.config.validate."""
    validate(cfg)
    if cfg.job.trainer_ranks < (0 if cfg.job.gpu_type else 1):
        raise ConfigError(f"job.trainer_ranks={cfg.job.trainer_ranks} must be at least 1")
    if not re.fullmatch(r"[A-Za-z0-9._-]+", cfg.name):
        raise ConfigError(f"name={cfg.name!r} may hold only letters, digits, '.', '_' and '-' (it names files)")
    if cfg.data.task not in TASKS and cfg.data.task != "dataset":
        raise ConfigError(f"data.task={cfg.data.task!r} is not a task; valid tasks: "
                          f"{', '.join(sorted(TASKS))}, dataset")
    if cfg.data.task == "dataset" and not cfg.data.train_path:
        raise ConfigError("data.task=dataset needs data.train_path (a parquet or jsonl file in verl's layout)")
    if cfg.train.off_policy_steps and cfg.job.layout == "colocated":
        raise ConfigError("train.off_policy_steps=1 needs a split layout (job.layout=split or auto): colocated, the "
                          "trainer and the engine take turns on each GPU, so nothing would overlap; or set "
                          "train.off_policy_steps=0")
    if cfg.job.gpu_type and cfg.job.gpus_per_node < 1:
        raise ConfigError(f"job.gpu_type={cfg.job.gpu_type!r} needs job.gpus_per_node of at least 1")


def check_split(cfg: Config, trainers: int) -> None:
    derive(cfg, trainers)


def splits(cfg: Config, trainers: int) -> bool:
    try:
        derive(cfg, trainers)
    except ConfigError:
        return False
    return True


def plan_job(cfg: Config, cluster=None) -> Plan:
    """`cluster`: an hpc.cluster.Cluster from sinfo (live or saved); None plans against the nominal hardware."""
    check_config(cfg)
    job = cfg.job
    executor, notes = job.executor, []
    if executor == "auto":
        executor = "slurm" if (cluster is not None or slurm_available()) else "local"
    if executor == "local" and job.nodes > 1:
        raise ConfigError(f"the local executor runs one node without Slurm; this job wants {job.nodes} nodes: "
                          "submit it on a Slurm cluster")
    partition, nodelist, host_gb, choice = job.partition, [], job.host_mem_gb, None
    if executor == "slurm" and cluster is not None:
        choice = choose_nodes(cfg, cluster)
        partition, nodelist, host_gb = choice.partition, choice.nodes, choice.host_gb
        notes += choice.notes
    elif executor == "slurm":
        notes.append("no cluster information: planned against the preset's nominal hardware")
    if job.gpu_type is None:
        plan = plan_cpu(cfg, executor)
    else:
        plan = plan_gpus(cfg, executor, host_gb)
    plan.partition, plan.nodelist = partition, nodelist
    if choice is not None:
        plan.exclude, plan.gres_typed = choice.exclude, choice.gres_typed
    plan.notes = notes + plan.notes
    return plan


def plan_cpu(cfg: Config, executor: str) -> Plan:
    job = cfg.job
    t, r = job.trainer_ranks, job.rollout_ranks
    check_split(cfg, t)
    if (t + r) % job.nodes:
        raise ConfigError(f"{t + r} CPU ranks (job.trainer_ranks + job.rollout_ranks) must split evenly over "
                          f"job.nodes={job.nodes}")
    notes = ["one machine, no Slurm needed: submitit's local executor"] if executor == "local" else []
    colocated = job.layout == "colocated"
    if colocated:
        notes.append("colocated: the engines sleep (drop their KV cache) while the trainers update")
    return Plan(executor=executor, device="cpu", nodes=job.nodes, tasks_per_node=(t + r) // job.nodes,
                trainers=list(range(t)), rollouts=list(range(t, t + r)), notes=notes,
                layout="colocated" if colocated else "split", time_share=colocated)


def plan_gpus(cfg: Config, executor: str, host_gb: float) -> Plan:
    """The fastest layout that fits (hpc.layouts, hpc.steptime), with its ranks, memory table and prediction."""
    job = cfg.job
    try:
        shape = resolve_shape(cfg.model.path, cfg.model.arch)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    card = GPU_MEMORY_GB.get(job.gpu_type)
    if card is None:
        raise ConfigError(f"job.gpu_type={job.gpu_type!r} has no memory size here; known: "
                          f"{', '.join(sorted(GPU_MEMORY_GB))}")
    total, per_node = job.nodes * job.gpus_per_node, job.gpus_per_node
    pick_tp(cfg, shape, card)  # refuses an engine that fits no node, whatever the layout
    search = layouts.Search(cfg, shape, nodes=job.nodes, per_node=per_node, host_gb=host_gb)
    found = search.candidates()
    chosen, alternatives, notes = layouts.choose(cfg, found, total)
    if chosen is None:
        raise ConfigError(misfit(cfg, shape, card, total, host_gb, found))
    seed = search.verl_seed() if total > 1 and cfg.job.layout != "split" else None
    if seed is not None and seed.settings != chosen.settings and cfg.model.param_offload is not False:
        alternatives.append(seed)
    c, p = chosen, chosen.prediction
    if p.layout == "colocated":
        if total > 1:
            check_split(cfg, total)
        tasks = 2 * per_node  # local ranks 0..N-1 train, N..2N-1 are their engines on the same GPUs
        trainers = [n * tasks + i for n in range(job.nodes) for i in range(per_node)]
        rollouts = [n * tasks + per_node + i for n in range(job.nodes) for i in range(per_node)]
        table = memory.format_estimates(phase_estimates(c), card, job.gpu_type)
        share = ("engine and trainer fit together: the engine stays awake" if c.engine_awake else
                 "the engine sleeps during the update; the trainer keeps only its resident state while it generates"
                 + (", its AdamW state swapped to the host" if c.swap_optimizer else ""))
        notes.append(f"colocated: {share}; engine memory share {c.utilization:.2f} of each GPU")
    else:
        check_split(cfg, p.trainers)
        tasks, trainers, rollouts = per_node, list(range(p.trainers)), list(range(p.trainers, total))
        table = memory.format_estimates([c.trainer, c.engine], card, job.gpu_type)
    notes = [f"each engine's KV cache holds {p.kv_seqs} sequences of {seq_len(cfg)} tokens",
             sync_note(cfg, shape, crosses_nodes=job.nodes > 1, colocated_one_gpu=total == 1,
                       param_offload=c.settings["model.param_offload"]),
             settings_note(cfg, c.settings)] + notes
    return Plan(executor=executor, device="cuda", nodes=job.nodes, tasks_per_node=tasks, trainers=trainers,
                rollouts=rollouts, gpu_type=job.gpu_type, gpus_per_node=per_node, tp=p.tp,
                tokens_per_micro_batch=c.tokens, memory_table=table, notes=notes, layout=p.layout,
                time_share=p.layout == "colocated" and not c.engine_awake, swap_optimizer=c.swap_optimizer,
                settings={**c.settings, "rollout.gpu_memory_utilization": c.utilization},
                prediction={"label": p.label, **p.phases()},
                alternatives=[{"label": a.prediction.label, **a.prediction.phases()} for a in alternatives])


def phase_estimates(c: layouts.Candidate) -> list[memory.Estimate]:
    """A colocated GPU's memory in its two phases: the update (the trainer, the engine asleep or awake) and
    generation (the trainer's resident state, the engine)."""
    update, gen = memory.Estimate("update"), memory.Estimate("generate")
    update.gpu.update(c.trainer.gpu)
    update.host.update(c.trainer.host)
    swapped = layouts.ADAM if c.swap_optimizer else ()
    gen.gpu.update({k: v for k, v in c.trainer.gpu.items() if k in layouts.RESIDENT and k not in swapped})
    gen.host.update(c.trainer.host)
    gen.host.update({f"{k}, swapped out": v for k, v in c.trainer.gpu.items() if k in swapped})
    engine = {f"engine: {k}": v for k, v in c.engine.gpu.items()}
    gen.gpu.update(engine)
    if c.engine_awake:
        update.gpu.update(engine)
    else:
        update.gpu["engine: asleep (CUDA context)"] = memory.CUDA_CONTEXT_GB
    return [update, gen]


def settings_note(cfg: Config, chosen: dict) -> str:
    words = {"model.activation_checkpointing": "activation checkpointing", "model.optimizer_offload":
             "optimizer offload", "model.param_offload": "parameter offload"}
    parts = []
    for key, word in words.items():
        asked = getattr(cfg.model, key.split(".")[1])
        parts.append(f"{word} {'on' if chosen[key] else 'off'}" + (" (set)" if asked is not None else ""))
    return ("memory: " + ", ".join(parts) + "; unset ones are the planner's: the fastest combination that fits, "
            "with the fewest savings")


def misfit(cfg: Config, shape: ModelShape, card: float, total: int, host_gb: float, found) -> str:
    """Why no layout fits: the largest trainer pool at the smallest budget with every allowed saving."""
    floor, per_node = seq_len(cfg), cfg.job.gpus_per_node
    split = cfg.job.layout == "split" or (cfg.job.layout == "auto" and (cfg.job.trainer_ranks or
                                                                        cfg.train.off_policy_steps))
    biggest = total
    if split:  # the largest trainer pool a split could have
        counts = ([cfg.job.trainer_ranks] if cfg.job.trainer_ranks else
                  [k * per_node for k in range(1, cfg.job.nodes)] if cfg.job.nodes > 1 else range(1, per_node))
        biggest = max([t for t in counts if splits(cfg, t)] or counts)
    option = layouts.memory_options(cfg)[-1]
    est = layouts.trainer_estimate(cfg, shape, biggest, floor, option)
    state = shape.params * (16 if not cfg.model.lora_rank else 2) / 1e12
    kind = "LoRA" if cfg.model.lora_rank else "full-parameter"
    why = (f"{shape.name} {kind} training on {biggest} x {card:.0f} GB does not fit: "
           f"{est.gpu_total:.0f} GB per GPU at {floor} tokens per micro-batch ("
           f"~{state:.2f} TB of training state over {biggest} GPUs"
           + (f", {est.host_total * min(biggest, per_node):.0f} GB offloaded per node of {host_gb:.0f} GB"
              if host_gb and est.host else "") + ")")
    hint = "allow model.param_offload / model.optimizer_offload (unset them), use LoRA (model.lora_rank), or more GPUs"
    if option[2]:
        hint = "use LoRA (model.lora_rank, the h100x8-lora preset) or more GPUs (32, the h800x32 preset)"
    if found:  # another layout fits: the config ruled it out
        hint = (f"{found[0].prediction.label} fits: set job.layout=auto, job.trainer_ranks=0 and "
                "train.off_policy_steps=0")
    return f"{why}; {hint}"


def apply_settings(cfg: Config, plan: dict) -> Config:
    """`cfg` with the planner's choices (Plan.settings) filled in: what every rank runs with."""
    cfg = copy_config(cfg)
    for key, value in plan.get("settings", {}).items():
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    return cfg


# Weight-sync bandwidths (grpo.hardware says where each was measured or why it is assumed)
SYNC_GBPS_NVLINK = hardware.SYNC_GBPS_NVLINK
SYNC_GBPS_NETWORK = hardware.SYNC_GBPS_NETWORK


def sync_note(cfg: Config, shape: ModelShape, *, crosses_nodes: bool, colocated_one_gpu: bool = False,
              param_offload: bool | None = None) -> str:
    """The expected weight-sync time per step: bf16 weights over the expected bandwidth. What travels: every weight
    (full fine-tuning); with LoRA the adapters (native engine) or, for vLLM, the adapted weights merged (the first
    sync also sends the others once; grpo.vllm_engine says why)."""
    m, extra = cfg.model, ""
    if m.lora_rank and cfg.rollout.engine == "vllm":
        nbytes = 2 * shape.linear_weights(lora_targets(m.lora_targets))
        what = "merged LoRA weights"
        extra = f"; the first sync also sends the other {(2 * shape.params - nbytes) / 1e9:.1f} GB once"
    elif m.lora_rank:
        nbytes, what = 2 * shape.lora_params(m.lora_rank), "LoRA adapters"
    else:
        nbytes, what = 2 * shape.params, "weights"
    if colocated_one_gpu:
        gbps, link = hardware.SYNC_GBPS_IPC, "CUDA IPC on the same GPU, measured"
    elif crosses_nodes:
        gbps, link = SYNC_GBPS_NETWORK, "400 Gb/s network, assumed"
    else:
        gbps = hardware.nvlink_sync_gbps(hardware.gpu(cfg.job.gpu_type))
        link = "NVLink, measured" if gbps == SYNC_GBPS_NVLINK else "NVLink, scaled from the H200 measurement"
    offloaded = m.param_offload if param_offload is None else param_offload
    if offloaded and (m.lora_rank == 0 or cfg.rollout.engine == "vllm"):  # the base shards live on the host
        extra += "; not counted: the trainers first copy their offloaded shards of it to their GPUs (PCIe)"
    seconds = nbytes / gbps / 1e9
    took = f"{seconds:.1f} s" if seconds >= 0.1 else f"{seconds * 1e3:.0f} ms"
    return f"weight sync ~{took} per step ({nbytes / 1e9:.1f} GB of bf16 {what} at {gbps:.0f} GB/s, {link}{extra})"


def lora_targets(spec: str) -> tuple[str, ...]:
    """model.lora_targets as layer names: () for all-linear."""
    if spec.strip() == "all-linear":
        return ()
    targets = tuple(t.strip() for t in spec.split(",") if t.strip())
    if not targets or any(t not in LINEAR_NAMES for t in targets):
        raise ConfigError(f"model.lora_targets={spec!r}: use 'all-linear' or a comma-separated subset of "
                          f"{', '.join(LINEAR_NAMES)}")
    return targets


def seq_len(cfg: Config) -> int:
    return cfg.data.max_prompt_len + cfg.rollout.max_new_tokens


MIN_ENGINE_SEQS = 16  # an engine whose KV cache holds fewer full sequences is not worth its GPUs


def pick_tp(cfg: Config, shape: ModelShape, card: float) -> tuple[int, memory.Estimate, int]:
    """The smallest tensor parallelism inside one node whose engine fits the card with room for its KV cache."""
    r, per_node = cfg.rollout, cfg.job.gpus_per_node
    options = [r.tensor_parallel] if r.tensor_parallel else [t for t in (1, 2, 4, 8, 16) if t <= per_node]
    if r.engine == "native":  # the native engine runs on one GPU; tensor parallelism is vLLM's
        if r.tensor_parallel > 1:
            raise ConfigError(f"rollout.tensor_parallel={r.tensor_parallel} needs rollout.engine=vllm")
        options = [1]
    need = min(r.max_num_seqs, MIN_ENGINE_SEQS)
    for tp in options:
        if per_node % tp:
            raise ConfigError(f"rollout.tensor_parallel={tp} must divide job.gpus_per_node={per_node}: "
                              "an engine stays inside one node")
        lora = cfg.model.lora_rank if r.engine == "native" else 0  # vLLM takes merged weights: no adapters there
        est, seqs = memory.rollout_memory(
            shape, tp=tp, card_gb=card, utilization=r.gpu_memory_utilization, seq_len=seq_len(cfg),
            max_num_seqs=r.max_num_seqs, lora_rank=lora,
            lora_base_copy=shape.linear_weights(lora_targets(cfg.model.lora_targets)) if lora else 0)
        if seqs >= need:
            return tp, est, seqs
    raise ConfigError(
        f"an engine for {shape.name} does not fit one node of {per_node} x {card:.0f} GB at "
        f"rollout.gpu_memory_utilization={r.gpu_memory_utilization}: at TP={tp} its KV cache holds {seqs} "
        f"sequences of {seq_len(cfg)} tokens, fewer than {need}; use larger GPUs or shorter sequences")


@dataclass
class NodeChoice:
    partition: str
    nodes: list[str]  # enough nodes available now (the job is not pinned to them)
    host_gb: float
    notes: list[str]  # skipped nodes with the reason, untyped GRES taken as job.gpu_type
    exclude: list[str]  # matching nodes seen down, drained or failing: kept out of the job, now and after a requeue
    gres_typed: bool = True


# node states that keep a node out of jobs until an administrator acts (not merely busy or powered down)
OUT_OF_SERVICE = frozenset({"drain", "down", "fail", "not_responding"})


def gpus_of(node, gpu_type: str) -> tuple[int, bool]:
    """GPUs of `gpu_type` on a node, and whether they are typed. Untyped GRES (`gpu:8`, common on real sites) has
    no type to check: its GPUs count as any type, and the plan says so."""
    if node.gpus.get(gpu_type, 0):
        return node.gpus[gpu_type], True
    return node.gpus.get(None, 0), False


def choose_nodes(cfg: Config, cluster) -> NodeChoice:
    """Partition and nodes for the job from the live cluster; the skipped nodes with the reason."""
    job = cfg.job
    need_gpus = job.gpus_per_node if job.gpu_type else 0
    try:
        parts = [cluster.partition(job.partition)] if job.partition else list(cluster.partitions)
    except ValueError as e:  # hpc.cluster.ClusterError: names the partitions there are
        raise ConfigError(f"job.partition: {e}") from None
    reasons = []
    for part in sorted(parts, key=lambda p: not p.default):
        matching = [n for n in cluster.nodes_in(part.name)
                    if not job.gpu_type or gpus_of(n, job.gpu_type)[0] >= need_gpus]
        if job.gpu_type and any(gpus_of(n, job.gpu_type)[1] for n in matching):
            # nodes typed as the card asked for: the untyped ones are left out, since a gpu:N request (all that
            # untyped nodes can take) could also land on nodes of another type
            matching = [n for n in matching if gpus_of(n, job.gpu_type)[1]]
        if job.gpu_type and not matching:
            reasons.append(f"partition {part.name} has no node with gpu:{job.gpu_type}:{need_gpus}")
            continue
        if part.state != "up":
            reasons.append(f"partition {part.name} is {part.state}")
            continue
        if len(matching) < job.nodes:
            reasons.append(f"partition {part.name} has {len(matching)} node(s) with "
                           + (f"gpu:{job.gpu_type}:{need_gpus}" if job.gpu_type else "its CPUs")
                           + f", the job needs {job.nodes}")
            continue
        if part.timelimit_s is not None and part.timelimit_s < job.time_limit_min * 60:
            reasons.append(f"partition {part.name} allows {part.timelimit_s // 60} min, the job asks "
                           f"job.time_limit_min={job.time_limit_min}")
            continue
        ready = [n for n in matching if n.state.available]
        skipped = [f"skipped node {n.name}: {n.state.reason()}" for n in matching if not n.state.available]
        if len(ready) < job.nodes:
            reasons.append(f"partition {part.name}: {len(ready)} of {len(matching)} matching nodes can start "
                           f"now, the job needs {job.nodes} ({'; '.join(skipped)})")
            continue
        chosen = ready[:job.nodes]
        host_gb = min(n.memory_mb for n in chosen) / 1024
        exclude = [n.name for n in cluster.nodes_in(part.name) if (n.state.flags | {n.state.name}) & OUT_OF_SERVICE]
        untyped = bool(job.gpu_type) and not all(gpus_of(n, job.gpu_type)[1] for n in matching)
        if untyped:
            skipped = [f"partition {part.name} has untyped GPU GRES (gpu:N): taken as job.gpu_type={job.gpu_type} "
                       f"(the memory plan assumes that card), requested as --gres=gpu:{need_gpus}; use "
                       "job.constraint to pick the card where the site has node features"] + skipped
        return NodeChoice(part.name, [n.name for n in chosen], host_gb, skipped, exclude, gres_typed=not untyped)
    what = f"{job.nodes} node(s)" + (f" with gpu:{job.gpu_type}:{need_gpus}" if job.gpu_type else "")
    raise ConfigError(f"no partition can take {what} now: " + "; ".join(reasons))


def format_plan(cfg: Config, plan: Plan) -> str:
    d, r = cfg.data, cfg.rollout
    where = f"{plan.executor}"
    if plan.partition:
        where += f", partition {plan.partition}"
    if plan.nodelist:
        where += f", nodes {','.join(plan.nodelist)}"
    dev = f"{plan.gpus_per_node} x {plan.gpu_type} per node, nccl" if plan.device == "cuda" else "cpu, gloo"
    lines = [
        f"plan for preset {cfg.name!r}",
        f"  executor   {where}: {plan.nodes} node(s) x {plan.tasks_per_node} task(s), {dev}",
        f"  trainer    ranks {fmt_ranks(plan.trainers)}: FSDP2 policy ({cfg.model.path})"
        + (f", LoRA r={cfg.model.lora_rank}" if cfg.model.lora_rank else "")
        + (", frozen reference" if cfg.algo.kl_coef > 0 and not cfg.model.lora_rank else "")
        + (f", {plan.tokens_per_micro_batch} tokens per micro-batch" if plan.tokens_per_micro_batch else ""),
        f"  rollout    ranks {fmt_ranks(plan.rollouts)}: {r.engine} engine"
        + (f", {len(plan.rollouts) // plan.tp} engine(s) of TP={plan.tp} inside a node" if plan.device == "cuda"
           else "") + (", each on its trainer's GPU (colocated)" if plan.layout == "colocated" else ""),
        f"  batch      {d.prompts_per_step} prompts x {r.n} samples, {r.max_new_tokens} new tokens, "
        f"{cfg.train.mini_batches} mini-batch(es), {cfg.train.steps} steps, task {d.task!r}",
    ]
    if plan.memory_table:
        lines.append(plan.memory_table)
    if plan.prediction:
        lines += format_prediction(plan)
    lines += [f"  note       {n}" for n in plan.notes]
    return "\n".join(lines)


def format_prediction(plan: Plan) -> list[str]:
    """The chosen layout's seconds per phase beside the best alternatives (hpc.steptime)."""
    rows = [("chosen", plan.prediction)] + [("", a) for a in plan.alternatives]
    width = max(len(r["label"]) for _, r in rows) + 2
    head = "".join(f"{p:>11}" for p in (*steptime.PHASES, "step"))
    lines = ["  step time  predicted seconds per step (hpc.steptime; responses at full length, grpo.hardware's "
             "constants)", f"  {'':<8}{'layout':<{width}}{head}"]
    for tag, r in rows:
        lines.append(f"  {tag:<8}{r['label']:<{width}}" + "".join(f"{r[p]:>11.2f}" for p in (*steptime.PHASES,
                                                                                              "step")))
    return lines


def fmt_ranks(ranks: list[int]) -> str:
    """Runs of consecutive ranks: "0-7,16-23" (a colocated plan's trainers), "3", "0-15"."""
    runs, start = [], 0
    for i in range(1, len(ranks) + 1):
        if i == len(ranks) or ranks[i] != ranks[i - 1] + 1:
            a, b = ranks[start], ranks[i - 1]
            runs.append(f"{a}" if a == b else f"{a}-{b}")
            start = i
    return ",".join(runs)
