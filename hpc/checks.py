"""Checks of the run's inputs on the login node, before anything is submitted: the model folder and the dataset.

A job that would die at start-up on a bad path or an unusable dataset is refused here with one line instead, after
minutes in the queue. Nothing here imports torch.
"""

from __future__ import annotations

import json
from pathlib import Path

from grpo.config import Config, ConfigError
from grpo.families import family_of


def check_model(cfg: Config) -> None:
    """The model folder exists, is readable and holds a config of a supported family (grpo.families) and
    safetensors weights."""
    if cfg.model.path == "tiny":
        return
    path = Path(cfg.model.path).expanduser()
    config = path / "config.json"
    if not path.is_dir():
        raise ConfigError(f"model.path={cfg.model.path!r} is not a folder here; point it at a Hugging Face "
                          "checkpoint folder (config.json + *.safetensors) that every node can read")
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.path={cfg.model.path!r}: cannot read config.json ({e.__class__.__name__}: "
                          f"{e})") from None
    try:
        family_of(data, where=f"model.path={cfg.model.path!r}")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise ConfigError(f"model.path={cfg.model.path!r} has no *.safetensors weights")
    for f in weights:
        check_safetensors(f)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(f"model.path={cfg.model.path!r} has no tokenizer files (one of "
                          f"{', '.join(TOKENIZER_FILES)}); copy them from the model's original folder (prompts would "
                          "become 0 tokens)")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def check_safetensors(path: Path) -> None:
    """The file is at least as long as its own header says: a 0-byte or cut-off download fails here, not after the
    queue wait. (A safetensors file starts with the 8-byte length of a JSON header that lists every tensor's byte
    range.)"""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            header = json.loads(f.read(n)) if 0 < n <= size - 8 else None
    except (OSError, ValueError) as e:
        raise ConfigError(f"model weights {path}: cannot read ({e.__class__.__name__}: {e})") from None
    ends = [v["data_offsets"][1] for k, v in (header or {}).items() if k != "__metadata__"] if header else []
    if header is None or 8 + n + max(ends, default=0) > size:
        raise ConfigError(f"model weights {path} ({size} bytes) is not a complete safetensors file (empty or cut "
                          "off); download it again")


def check_dataset(cfg: Config, tokenizer=None) -> str | None:
    """The dataset is readable, has verl's columns, and some prompts fit data.max_prompt_len (needs the tokenizer;
    without one only the columns are checked). Returns the loader's report line."""
    if cfg.data.task != "dataset":
        return None
    from grpo.data import expand_paths, load_prompts, read_dataset

    path = cfg.data.train_path
    try:
        if tokenizer is None:
            for file in expand_paths(path):  # a list or a glob: every file
                columns, _ = read_dataset(file)
                missing = [c for c in ("prompt", "reward_model") if c not in columns]
                if missing:
                    raise ValueError(f"dataset {file} has no column {missing[0]!r} (columns: "
                                     f"{', '.join(columns)}); expected verl's layout: run python -m grpo.preprocess")
            return None
        prompts = load_prompts(path, tokenizer=tokenizer, max_prompt_len=cfg.data.max_prompt_len)
        check_prompts(cfg, path, prompts)
        return prompts.report
    except (OSError, ValueError) as e:
        raise ConfigError(f"data.train_path: {e}") from None


def check_prompts(cfg: Config, path: Path, prompts) -> None:
    """What the job would die on after the queue wait: fewer usable prompts than one step draws, an empty prompt.
    (A data_source without a scorer: check_reward.)"""
    from grpo.data import read_dataset

    _, rows = read_dataset(path)
    empty = [i for i, row in enumerate(rows) if not _prompt_text(row.get("prompt")).strip()]
    if empty:
        raise ValueError(f"dataset {path} has {len(empty)} empty prompt(s) (first: row {empty[0]}); remove them")
    if len(prompts) < cfg.data.prompts_per_step:
        raise ValueError(f"dataset {path} has {len(prompts)} usable prompts ({prompts.num_dropped} longer than "
                         f"data.max_prompt_len dropped), fewer than data.prompts_per_step={cfg.data.prompts_per_step}; "
                         "lower data.prompts_per_step or use a larger dataset")


def _prompt_text(value) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        return "".join(str(m.get("content") or "") if isinstance(m, dict) else str(m) for m in value)
    return "" if value is None else str(value)


def check_lead_time(cfg: Config, plan) -> str:
    """The signal lead time (job.signal_delay_s) must cover writing a checkpoint of this model: its fp32 parameters
    and AdamW states (LoRA: the frozen base plus the adapters and their states) at job.write_gbps per trainer
    node. Returns the note printed with the plan; ConfigError when the lead time is too short."""
    from hpc.models import resolve_shape

    try:
        shape = resolve_shape(cfg.model.path, cfg.model.arch)
    except (OSError, ValueError, KeyError):
        return ""  # check_model or the planner says what is wrong with the model
    if cfg.model.lora_rank:
        nbytes = 2 * shape.params + 12 * shape.lora_params(cfg.model.lora_rank)
    else:
        nbytes = 12 * shape.params
    per_node = plan.gpus_per_node if plan.device == "cuda" else plan.tasks_per_node
    nodes = max(1, -(-len(plan.trainers) // max(1, per_node)))
    seconds = nbytes / (cfg.job.write_gbps * 1e9 * nodes)
    need = int(LEAD_FACTOR * seconds + LEAD_MARGIN_S) + 1
    note = (f"a checkpoint is {nbytes / 1e9:.1f} GB, about {seconds:.0f} s at {cfg.job.write_gbps:g} GB/s per node x "
            f"{nodes} node(s); signal lead time {cfg.job.signal_delay_s} s (at least {need} s)")
    if cfg.job.signal_delay_s < need:
        raise ConfigError(f"job.signal_delay_s={cfg.job.signal_delay_s} is too short to save a "
                          f"{nbytes / 1e9:.0f} GB checkpoint at job.write_gbps={cfg.job.write_gbps:g} per node "
                          f"({seconds:.0f} s): set job.signal_delay_s={need} or more (or job.write_gbps to what "
                          "your filesystem gives)")
    return note


LEAD_FACTOR, LEAD_MARGIN_S = 1.5, 10  # the write estimate is a guess: half again, plus the last step's tail


def check_engine(cfg: Config) -> None:
    """The vLLM engine needs vLLM in this environment (the job runs the same Python). LoRA runs with it too: the
    trainer sends the merged weights, not the adapters (grpo.vllm_engine says why)."""
    import importlib.util

    if cfg.rollout.engine == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ConfigError("rollout.engine=vllm needs vLLM 0.24 to 0.33 in this environment: pip install -e '.[vllm]' "
                          "(or --set rollout.engine=native)")


def check_algo(cfg: Config) -> None:
    """Combinations of algorithm settings that the kernels refuse, caught before the job starts."""
    if cfg.algo.leave_one_out and cfg.algo.norm_adv_by_std:
        raise ConfigError("algo.leave_one_out=true (RLOO) is not divided by the group std, as verl's rloo "
                          "estimator: add --set algo.norm_adv_by_std=false")


def check_inputs(cfg: Config) -> list[str]:
    """Every check that can run here; returns lines worth printing with the plan."""
    check_algo(cfg)
    check_engine(cfg)
    check_model(cfg)
    tokenizer = None
    if cfg.data.task == "dataset" and cfg.model.path != "tiny":
        from grpo.data import load_pretrained_tokenizer

        try:
            tokenizer = load_pretrained_tokenizer(cfg.model.path)
        except (OSError, ValueError) as e:
            raise ConfigError(f"model.path={cfg.model.path!r}: cannot load its tokenizer ({e})") from None
    report = check_dataset(cfg, tokenizer)
    return (([report] if report else []) + check_reward(cfg) + check_validation(cfg) + check_tracking(cfg)
            + check_sampling(cfg))


# --- rewards, validation, tracking (issue 16) ---------------------------------------------------------------------

def _rows(spec: str, what: str) -> list[dict]:
    from grpo.data import expand_paths, read_dataset

    try:
        return [row for file in expand_paths(spec) for row in read_dataset(file)[1]]
    except (OSError, ValueError) as e:
        raise ConfigError(f"{what}: {e}") from None


def check_reward(cfg: Config) -> list[str]:
    """Every data source of the dataset has a scorer: a built-in one, or the user's reward.function, which must
    load and answer one call on a sample row within reward.timeout_s (in a worker process, as in the job)."""
    r = cfg.reward
    if cfg.data.task != "dataset":
        if r.function:
            raise ConfigError(f"reward.function scores dataset rows; data.task={cfg.data.task!r} is a toy task with "
                              "its own reward: set data.task=dataset and data.train_path")
        return []
    if r.timeout_s <= 0 or r.workers < 0:
        raise ConfigError(f"reward.timeout_s={r.timeout_s}, reward.workers={r.workers}: timeout_s must be > 0 and "
                          "workers >= 0 (0: one per CPU of the task)")
    from grpo.rewards import known_data_sources

    rows = _rows(cfg.data.train_path, "data.train_path")
    if cfg.data.val_path:
        rows += _rows(cfg.data.val_path, "data.val_path")
    if not r.function:
        known = known_data_sources()
        unknown = sorted({str(row.get("data_source") or "") for row in rows} - set(known))
        if unknown:
            raise ConfigError(f"data_source {unknown[0]!r} has no built-in scorer (built-in: {', '.join(known)}); "
                              "score it with your own function: --set reward.function=path/to/file.py:compute_score "
                              "(verl's signature: compute_score(data_source, solution_str, ground_truth, "
                              "extra_info=None) -> float or dict with 'score')")
        return []
    from grpo.scoring import ScoringPool, parse_function_spec

    try:
        path, name = parse_function_spec(r.function)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if not path.is_file():
        raise ConfigError(f"reward.function: {path} is not a file here (it must be readable on every node)")
    row = rows[0]
    truth = str((row.get("reward_model") or {}).get("ground_truth", ""))
    task = (str(row.get("data_source") or ""), truth, truth,
            row.get("extra_info") if isinstance(row.get("extra_info"), dict) else None)
    try:
        with ScoringPool(function=r.function, gsm8k=r.gsm8k, workers=1, timeout_s=r.timeout_s,
                         startup_timeout_s=60) as pool:
            scores, _, stats = pool.score([task])
    except RuntimeError as e:  # the worker could not import the file or find the function
        raise ConfigError(f"reward.function={r.function}: {e}") from None
    if stats["timeouts"]:
        raise ConfigError(f"reward.function={r.function} did not return within reward.timeout_s={r.timeout_s:g} s "
                          "on a sample row of the training data")
    if stats["errors"]:
        raise ConfigError(f"reward.function={r.function} failed on a sample row of the training data: "
                          f"{stats['first_error']}")
    return [f"reward: {name}() from {path} scored a sample row ({task[0] or 'no data_source'}) {scores[0]:g}"]


def check_validation(cfg: Config) -> list[str]:
    """train.val_every needs validation prompts: data.val_path for a dataset run (toy tasks draw their own)."""
    d, every = cfg.data, cfg.train.val_every
    if every < 0 or d.val_n < 1 or d.val_max_prompts < 0:
        raise ConfigError(f"train.val_every={every}, data.val_n={d.val_n}, data.val_max_prompts="
                          f"{d.val_max_prompts}: val_every >= 0 (0 is off), val_n >= 1, val_max_prompts >= 0")
    if d.val_path and d.task != "dataset":
        raise ConfigError(f"data.val_path is read with data.task=dataset; the toy task {d.task!r} validates on "
                          "prompts of its own (set train.val_every only)")
    if every and d.task == "dataset" and not d.val_path:
        raise ConfigError("train.val_every needs data.val_path (validation prompts in verl's layout)")
    if every and d.val_path:
        for row in _rows(d.val_path, "data.val_path")[:1]:
            if "prompt" not in row or "reward_model" not in row:
                raise ConfigError(f"data.val_path {d.val_path}: rows need 'prompt' and 'reward_model' (verl's "
                                  "layout): run python -m grpo.preprocess")
    return []


def check_tracking(cfg: Config) -> list[str]:
    """W&B is optional: asked for, it must be installed here (the job runs this Python)."""
    import importlib.util

    if cfg.track.wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError("track.wandb=true needs wandb in this environment: pip install 'hpc-grpo[wandb]' (set "
                          "WANDB_MODE=offline on nodes without a network), or --set track.wandb=false")
    if cfg.track.samples_per_step < 0:
        raise ConfigError(f"track.samples_per_step={cfg.track.samples_per_step} must be >= 0")
    return []


def check_sampling(cfg: Config) -> list[str]:
    """top_p in (0, 1] and top_k >= 0 (0 is off), as both engines read them."""
    r = cfg.rollout
    if not 0 < r.top_p <= 1 or r.top_k < 0:
        raise ConfigError(f"rollout.top_p={r.top_p}, rollout.top_k={r.top_k}: top_p must be in (0, 1] (1 is off) "
                          "and top_k >= 0 (0 is off)")
    return []
