"""Typed run configuration: small dataclasses per component, one `Config` that holds them.

No torch here: the login-node command (`python -m hpc.submit`) imports this module.
Overrides are flat dotted keys (`train.lr=3e-5`) checked against the field types.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional


class ConfigError(ValueError):
    """A user error in a preset override or a config file."""


@dataclass(kw_only=True)
class ModelConfig:
    path: str = "tiny"  # "tiny": the Qwen2 model built by grpo.tiny; else a local Hugging Face folder
    arch: str = ""  # shape name for planning when `path` is not readable here (hpc.models); "" = read path
    dtype: Literal["float32", "bfloat16"] = "float32"
    lora_rank: int = 0  # 0: full fine-tuning
    lora_alpha: int = 32
    lora_targets: str = "all-linear"
    # memory savings: None = the planner turns them on only where memory needs them (hpc.layouts), True = always,
    # False = never. The ranks run with the plan's choice (hpc.plan.apply_settings); CPU plans use None as False.
    activation_checkpointing: Optional[bool] = None
    param_offload: Optional[bool] = None  # FSDP2 CPUOffloadPolicy: shards, gradients and AdamW on the host
    optimizer_offload: Optional[bool] = None  # AdamW state on the host between optimizer steps


@dataclass(kw_only=True)
class DataConfig:
    task: str = "repeat"  # a toy task of grpo.tasks, or "dataset": prompts from train_path
    train_path: str = ""  # parquet or jsonl in verl's layout (grpo.data); several: a comma-separated list or a glob
    prompts_per_step: int = 8
    max_prompt_len: int = 32
    val_path: str = ""  # validation prompts (same layout, list or glob); scored every train.val_every steps
    val_n: int = 1  # samples per validation prompt: 1 = greedy (temperature 0), more = rollout.temperature
    val_max_prompts: int = 0  # 0: every validation prompt; else the first this many of the file order


@dataclass(kw_only=True)
class RolloutConfig:
    engine: Literal["native", "vllm"] = "native"
    n: int = 8  # samples per prompt: the GRPO group size
    max_new_tokens: int = 8
    temperature: float = 1.0
    top_p: float = 1.0  # nucleus sampling (1.0: off); the engines' log-probs are of the filtered distribution
    top_k: int = 0  # 0: off
    tensor_parallel: int = 0  # 0: the planner picks the smallest that fits, inside one node
    gpu_memory_utilization: float = 0.85  # share of each rollout GPU the engine may take
    max_num_seqs: int = 256  # sequences an engine runs at once (sizes the KV cache)
    sync_bucket_mb: int = 1024  # weight-sync bucket size
    ignore_eos: bool = False  # sample every response to max_new_tokens (benchmarks: fixed lengths, as vLLM's flag)
    # colocated: the engine sleeps during the update (verl's free_cache_engine: vLLM sleep mode frees its weights and
    # KV cache, the native engine its KV cache). None: the planner decides (sleep only when both do not fit)
    free_cache_engine: Optional[bool] = None


@dataclass(kw_only=True)
class AlgoConfig:
    clip_low: float = 0.2
    clip_high: float = 0.2
    clip_c: float = 3.0  # dual-clip constant, > 1
    kl_coef: float = 0.001  # 0 turns the KL loss (and the reference model) off
    kl_kind: Literal["k1", "kl", "abs", "k2", "mse", "k3", "low_var_kl"] = "low_var_kl"
    entropy_coef: float = 0.0
    agg: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = "token-mean"
    norm_adv_by_std: bool = True  # False: Dr.GRPO
    leave_one_out: bool = False
    adv_eps: float = 1e-6
    kernels: Literal["auto", "triton", "torch"] = "auto"  # auto: Triton on GPUs, the torch references on the CPU
    # verl's rollout correction: a truncated importance weight min(pi_old / pi_rollout, threshold) on each token's
    # policy-gradient loss ("token") or one per response ("sequence"); "auto": token-level when the batch was
    # sampled by older weights (train.off_policy_steps > 0), off otherwise
    rollout_is: Literal["auto", "none", "token", "sequence"] = "auto"
    rollout_is_threshold: float = 2.0


@dataclass(kw_only=True)
class TrainConfig:
    steps: int = 100
    lr: float = 1e-6
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float = 1.0
    mini_batches: int = 1  # optimizer steps per rollout batch; must divide the rows of each trainer rank
    max_tokens_per_gpu: int = 0  # token budget of a micro-batch (0: one micro-batch per mini-batch)
    # pack each micro-batch's sequences into one row with no padding (verl's use_remove_padding); the budget then
    # counts real tokens. false: right-padded rows, the budget counts rows x longest row
    pack: bool = True
    defer_grad_sync: bool = False  # reduce-scatter once per mini-batch: less traffic, unsharded grads held
    export_hf: bool = True  # write the trained policy as a Hugging Face folder (run_dir/hf) at the end
    # 1: the engines generate batch k+1 (with the weights from before update k) while the trainers update on batch
    # k (split layouts only); 0: on-policy, each batch sampled by the weights it updates
    off_policy_steps: int = 0
    seed: int = 0
    val_every: int = 0  # validate every this many steps and before the first (verl's test_freq); 0: never
    checkpoint_every: int = 0  # 0: only at the end (and when the job is preempted or reaches its time limit)
    keep_checkpoints: int = 2
    max_bad_steps: int = 3  # consecutive steps with a non-finite loss or grad norm before the run aborts


@dataclass(kw_only=True)
class RewardConfig:
    """How dataset responses are scored (grpo.scoring): built-in scorers by data source, or the user's function."""

    # "path/to/file.py:fn" with verl's signature fn(data_source, solution_str, ground_truth, extra_info=None) ->
    # float or {"score": float, ...}; it scores every row (call grpo.rewards.default_compute_score for the built-ins)
    function: str = ""
    gsm8k: Literal["lenient", "strict"] = "lenient"  # strict: verl's gsm8k.py exactly; lenient: numeric compare
    workers: int = 0  # scoring processes; 0: one per CPU this process may use, at most 16
    timeout_s: float = 10.0  # per response: a scorer that runs longer is killed, the response scores 0


@dataclass(kw_only=True)
class TrackConfig:
    """Where metrics go besides metrics.jsonl: TensorBoard event files in the run folder (always), W&B if asked."""

    wandb: bool = False  # needs `pip install wandb`; WANDB_MODE=offline works without a network
    wandb_project: str = "hpc-grpo"
    samples_per_step: int = 4  # completions (prompt, response, reward) written to samples.jsonl each step


@dataclass(kw_only=True)
class JobConfig:
    """Resources. `hpc.plan` turns these into ranks and roles."""

    executor: Literal["auto", "local", "slurm"] = "auto"  # auto: Slurm when sinfo answers, else local
    # split: trainer GPUs and rollout GPUs; colocated: every GPU holds a trainer rank and an engine that take turns
    # (verl's layout); auto: the planner's step-time model picks the faster layout that fits
    layout: Literal["auto", "split", "colocated"] = "auto"
    gpu_type: Optional[str] = None  # None: CPU ranks (gloo)
    nodes: int = 1
    gpus_per_node: int = 0
    trainer_ranks: int = 1  # CPU jobs: trainer processes. GPU jobs: trainer GPUs, 0 = the planner's split
    rollout_ranks: int = 1  # CPU jobs only: rollout processes
    trainer_fraction: float = 0.5  # GPU jobs with trainer_ranks=0: the share of GPUs the planner aims to train on
    host_mem_gb: int = 0  # host memory per node when no cluster says it (0: unknown, not checked)
    partition: Optional[str] = None
    time_limit_min: int = 30
    cpus_per_task: int = 1
    signal_delay_s: int = 120  # Slurm sends USR2 this long before the time limit: save, then requeue
    collective_timeout_s: int = 600  # a rank that stops answering ends the job after this long
    write_gbps: float = 1.0  # GB/s one node writes to the run folder's filesystem: sizes the lead time of a save
    # site fields, passed to sbatch as they are (None / False: the flag is left out)
    account: Optional[str] = None  # --account: the allocation charged
    qos: Optional[str] = None  # --qos
    constraint: Optional[str] = None  # --constraint: node features, e.g. "h100&ib"
    mem: Optional[str] = None  # --mem per node: "0" (all of it), "500G", "512000" (MB)
    exclusive: bool = False  # --exclusive: no other job on the nodes
    reservation: Optional[str] = None  # --reservation


@dataclass(kw_only=True)
class Config:
    name: str = "run"
    out_dir: str = "runs"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    track: TrackConfig = field(default_factory=TrackConfig)
    job: JobConfig = field(default_factory=JobConfig)


# The allowed range of every numeric field, in interval notation ("[1, inf)": at least 1). One table, checked by
# `validate` before anything is created; a test keeps it complete (every int or float field has a row). Floats must
# also be finite: nan passes every comparison and inf overflows later, both far from the cause.
RANGES: dict[str, str] = {
    "model.lora_rank": "[0, 4096]", "model.lora_alpha": "[1, inf)",
    "data.prompts_per_step": "[1, inf)", "data.max_prompt_len": "[1, inf)", "data.val_n": "[1, inf)",
    "data.val_max_prompts": "[0, inf)", "rollout.top_p": "(0, 1]", "rollout.top_k": "[0, inf)",
    "train.val_every": "[0, inf)", "reward.workers": "[0, inf)", "reward.timeout_s": "(0, inf)",
    "track.samples_per_step": "[0, inf)",
    "rollout.n": "[1, inf)", "rollout.max_new_tokens": "[1, inf)", "rollout.temperature": "(0, inf)",
    "rollout.tensor_parallel": "[0, inf)", "rollout.gpu_memory_utilization": "(0, 1]",
    "rollout.max_num_seqs": "[1, inf)", "rollout.sync_bucket_mb": "[1, inf)",
    "algo.clip_low": "[0, 1)", "algo.clip_high": "[0, inf)", "algo.clip_c": "(1, inf)", "algo.kl_coef": "[0, inf)",
    "algo.entropy_coef": "(-inf, inf)", "algo.adv_eps": "(0, 1]", "algo.rollout_is_threshold": "(0, inf)",
    "train.steps": "[1, inf)", "train.lr": "(0, inf)", "train.weight_decay": "[0, inf)",
    "train.warmup_steps": "[0, inf)", "train.off_policy_steps": "[0, 1]",
    "train.grad_clip": "(0, inf)", "train.mini_batches": "[1, inf)", "train.max_tokens_per_gpu": "[0, inf)",
    "train.seed": f"[0, {2**63 - 1}]",  # a signed 64-bit integer (torch's generators unpack a long long)
    "train.checkpoint_every": "[0, inf)", "train.keep_checkpoints": "[0, inf)", "train.max_bad_steps": "[1, inf)",
    "job.nodes": "[1, inf)", "job.gpus_per_node": "[0, inf)", "job.trainer_ranks": "[0, inf)",
    "job.rollout_ranks": "[1, inf)", "job.trainer_fraction": "(0, 1)", "job.host_mem_gb": "[0, inf)",
    "job.time_limit_min": "[1, inf)", "job.cpus_per_task": "[1, inf)", "job.signal_delay_s": "[0, inf)",
    "job.collective_timeout_s": "[1, inf)", "job.write_gbps": "(0, inf)",
}


def _in_range(value: float, spec: str) -> bool:
    # integer bounds stay integers: float(2**63 - 1) rounds up to 2**63 and would let 2**63 through
    lo, hi = (int(x) if x.strip().lstrip("-").isdigit() else float(x) for x in spec[1:-1].split(","))
    above = value > lo if spec[0] == "(" else value >= lo
    below = value < hi if spec[-1] == ")" else value <= hi
    return above and below


def _control_char(text: str) -> str | None:
    return next((c for c in text if ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0), None)


def check_text(what: str, text: str) -> None:
    """Refuse control characters in a value that reaches a script, a path or a job name: a newline in an sbatch
    script ends a `#SBATCH` line and starts a command, and shlex.quote does not protect against that."""
    bad = _control_char(text)
    if bad is not None:
        raise ConfigError(f"{what}={text!r} holds a control character ({bad!r}); remove it")


def validate(cfg: Config) -> None:
    """Every field in its range (RANGES), every float finite, no control character in any text, and the time limit
    longer than the signal delay. ConfigError naming the field and the range."""
    for key, hint in flat_keys(cfg).items():
        node = cfg
        for part in key.split("."):
            node = getattr(node, part)
        if isinstance(node, bool) or node is None:
            continue
        if isinstance(node, str):
            check_text(key, node)
        elif isinstance(node, (int, float)):
            spec = RANGES[key]
            if not math.isfinite(node) or not _in_range(node, spec):
                kind = "an integer" if isinstance(node, int) else "a finite number"
                raise ConfigError(f"{key}={node} is out of range: it must be {kind} in {spec}")
    job = cfg.job
    if job.signal_delay_s >= job.time_limit_min * 60:
        raise ConfigError(f"job.signal_delay_s={job.signal_delay_s} is not shorter than job.time_limit_min="
                          f"{job.time_limit_min} ({job.time_limit_min * 60} s): the run would stop before its first "
                          "step; raise the time limit or lower the signal delay")


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(data: dict[str, Any], cls: type = Config) -> Any:
    """Rebuild a config from `to_dict` output (the run folder's config.json)."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value = data[f.name]
        kwargs[f.name] = from_dict(value, hints[f.name]) if dataclasses.is_dataclass(hints[f.name]) else value
    return cls(**kwargs)


def to_json(cfg: Config) -> str:
    return json.dumps(to_dict(cfg), indent=2, sort_keys=True)


def flat_keys(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """{"train.lr": type hint, ...} for every leaf field."""
    out = {}
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out.update(flat_keys(value, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = hints[f.name]
    return out


def apply_overrides(cfg: Config, overrides: list[str], *, where: str = "") -> Config:
    """Return a copy of `cfg` with `key=value` overrides applied, each value parsed by its field's type."""
    cfg = copy_config(cfg)
    valid = flat_keys(cfg)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep:
            raise ConfigError(f"override {item!r} is not key=value (for example train.lr=1e-5)")
        if key not in valid:
            raise ConfigError(f"{where + ': ' if where else ''}unknown key {key!r}; valid keys: "
                              f"{', '.join(sorted(valid))}")
        value = parse_value(text, valid[key], key)
        *path, leaf = key.split(".")
        node = cfg
        for part in path:
            node = getattr(node, part)
        setattr(node, leaf, value)
    return cfg


def apply_mapping(cfg: Config, mapping: dict, *, where: str = "config file") -> Config:
    """Return a copy of `cfg` with the values of a config file applied: a nested mapping that mirrors the
    dataclasses (`train: {lr: 1e-6}`), flat dotted keys (`train.lr: 1e-6`), or both. Values are checked by the same
    rules as `--set` (YAML's own types pass through text, so `1e-6` is a float for a float field either way)."""
    return apply_overrides(cfg, [f"{key}={_as_text(value, key, where)}" for key, value in
                                 _flatten_mapping(mapping, where).items()], where=where)


def _flatten_mapping(mapping, where: str, prefix: str = "") -> dict:
    if not isinstance(mapping, dict):
        raise ConfigError(f"{where}: expected a mapping of config keys, got {type(mapping).__name__}")
    out = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten_mapping(value, where, f"{name}."))
        else:
            out[name] = value
    return out


def _as_text(value, key: str, where: str) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return str(value)
    raise ConfigError(f"{where}: {key} is a {type(value).__name__}; config values are numbers, strings, booleans "
                      "or null (write a list of files as one comma-separated string)")


def read_config_file(path: str) -> dict:
    """The mapping in a YAML (or JSON, a subset of YAML) config file; ConfigError when it is not one."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"--config {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of config keys, got a {type(data).__name__}")
    return data


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML, nested like the dataclasses: a valid --config file for the same run."""
    import yaml

    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)


def copy_config(cfg: Config) -> Config:
    return from_dict(to_dict(cfg))


def parse_value(text: str, hint: Any, key: str) -> Any:
    """Parse `text` as a value of type `hint` (int, float, bool, str, Optional[...], Literal[...])."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if text.lower() in ("none", "null"):
            return None
        return parse_value(text, args[0], key)
    if origin is Literal:
        choices = typing.get_args(hint)
        if text not in choices:
            raise ConfigError(f"{key}={text!r} is not one of: {', '.join(map(str, choices))}")
        return text
    if hint is bool:
        low = text.lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{key}={text!r} is not a bool (use true or false)")
    if hint is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{key}={text!r} is not an int") from None
    if hint is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{key}={text!r} is not a float") from None
    if hint is str:
        return text
    raise ConfigError(f"{key}: unsupported field type {hint!r}")  # a bug in the config classes, not user input


@dataclass(frozen=True)
class Derived:
    """Every per-rank batch number, from the few global quantities a user sets."""

    responses_per_step: int  # data.prompts_per_step x rollout.n
    responses_per_rank: int  # each trainer rank's share
    mini_batch_prompts: int  # prompts per optimizer step, over all ranks (verl's ppo_mini_batch_size)
    mini_batch_rows: int  # responses per optimizer step on each trainer rank
    optimizer_steps: int  # per GRPO step (train.mini_batches)
    max_tokens_per_micro_batch: int  # 0: one micro-batch per mini-batch


def derive(cfg: Config, trainer_ranks: int) -> Derived:
    """The per-rank numbers for `trainer_ranks` data-parallel trainer ranks; ConfigError when they cannot split."""
    d, n, mini = cfg.data.prompts_per_step, cfg.rollout.n, cfg.train.mini_batches
    rows = d * n
    if trainer_ranks < 1 or rows % trainer_ranks:
        raise ConfigError(f"{rows} responses per step (data.prompts_per_step x rollout.n) must split evenly over "
                          f"{trainer_ranks} trainer ranks (job.trainer_ranks)")
    per_rank = rows // trainer_ranks
    if mini < 1 or per_rank % mini or d % mini:
        raise ConfigError(f"train.mini_batches={mini} must divide both data.prompts_per_step={d} and the {per_rank} "
                          f"responses of each of the {trainer_ranks} trainer ranks (job.trainer_ranks)")
    return Derived(responses_per_step=rows, responses_per_rank=per_rank, mini_batch_prompts=d // mini,
                   mini_batch_rows=per_rank // mini, optimizer_steps=mini,
                   max_tokens_per_micro_batch=cfg.train.max_tokens_per_gpu)
