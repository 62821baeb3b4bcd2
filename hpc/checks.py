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
    from grpo.data import load_prompts, read_dataset

    path = Path(cfg.data.train_path).expanduser()
    try:
        if tokenizer is None:
            columns, _ = read_dataset(path)
            missing = [c for c in ("prompt", "reward_model") if c not in columns]
            if missing:
                raise ValueError(f"dataset {path} has no column {missing[0]!r} (columns: {', '.join(columns)}); "
                                 "expected verl's layout: run python -m grpo.preprocess")
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
    return [report] if report else []
