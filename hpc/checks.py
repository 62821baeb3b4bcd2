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
    if not any(path.glob("*.safetensors")):
        raise ConfigError(f"model.path={cfg.model.path!r} has no *.safetensors weights")


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
        return load_prompts(path, tokenizer=tokenizer, max_prompt_len=cfg.data.max_prompt_len).report
    except (OSError, ValueError) as e:
        raise ConfigError(f"data.train_path: {e}") from None


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
