"""Where the driver's prompts come from and how responses are scored: a toy task or a dataset in verl's layout.

Both sources give `Item`s (prompt token ids and a scorer) batch by batch, and have a state for checkpoints.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

from grpo.config import Config
from grpo.data import load_pretrained_tokenizer
from grpo.rollout import Completion


@dataclass(frozen=True)
class Item:
    prompt_ids: list[int]
    score: Callable[[str], float]  # response text -> reward


def load_tokenizer(cfg: Config):
    if cfg.model.path == "tiny":
        from grpo.tiny import build_tokenizer

        return build_tokenizer()
    return load_pretrained_tokenizer(cfg.model.path)


def special_ids(tokenizer) -> tuple[int, int]:
    """(pad, eos) token ids; a tokenizer without a pad token pads with EOS (masked out everywhere)."""
    eos = tokenizer.eos_token_id
    return (eos if tokenizer.pad_token_id is None else tokenizer.pad_token_id), eos


class ToySource:
    """Prompts drawn from a toy task with a seeded RNG. Responses keep their special tokens when scored, so a pad or
    unknown token inside an answer is a wrong word rather than an invisible one."""

    def __init__(self, cfg: Config, tokenizer):
        from grpo.tasks import make_task

        self.task, self.tok = make_task(cfg.data.task), tokenizer
        self.rng = random.Random(cfg.train.seed)
        self.batch_size = cfg.data.prompts_per_step

    def next_batch(self) -> list[Item]:
        prompts = [self.task.sample(self.rng) for _ in range(self.batch_size)]
        return [Item(self.tok(p.text).input_ids, lambda text, p=p: self.task.reward(p, text)) for p in prompts]

    def response_text(self, c: Completion) -> str:
        ids = c.token_ids[:-1] if c.finish_reason == "stop" else c.token_ids
        return self.tok.decode(ids, skip_special_tokens=False)

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        self.rng.setstate(state["rng"])


class DatasetSource:
    """Prompts from a parquet/jsonl file in verl's layout, epoch by epoch in a seeded order; rule-based rewards by
    each row's data source (GSM8K `####`, MATH `\\boxed{}`)."""

    def __init__(self, cfg: Config, tokenizer):
        from grpo.data import load_prompts
        from grpo.rewards import reward_fn_for

        self.tok = tokenizer
        prompts = load_prompts(cfg.data.train_path, tokenizer=tokenizer, max_prompt_len=cfg.data.max_prompt_len)
        print(prompts.report, flush=True)
        self.rewards = {s: reward_fn_for(s) for s in prompts.data_sources}  # an unknown source fails here
        self.batches = prompts.batches(batch_size=cfg.data.prompts_per_step, seed=cfg.train.seed)

    def next_batch(self) -> list[Item]:
        return [Item(x.prompt_ids, lambda text, x=x: self.rewards[x.data_source](text, x.ground_truth))
                for x in next(self.batches)]

    def response_text(self, c: Completion) -> str:
        return self.tok.decode(c.token_ids, skip_special_tokens=True)

    def state_dict(self) -> dict:
        return self.batches.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.batches.load_state_dict(state)


def make_source(cfg: Config, tokenizer):
    return DatasetSource(cfg, tokenizer) if cfg.data.task == "dataset" else ToySource(cfg, tokenizer)
