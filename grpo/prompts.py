"""Where the driver's prompts come from and how responses are scored: a toy task or a dataset in verl's layout.

Both sources give `Item`s batch by batch, score a batch of responses (`score`), and have a state for checkpoints.
A dataset's responses are scored in worker processes (grpo.scoring); a toy task's in the driver (microseconds).
"""

from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

from grpo.config import Config
from grpo.data import load_pretrained_tokenizer
from grpo.rollout import Completion


@dataclass(frozen=True)
class Item:
    prompt_ids: list[int]
    score: Optional[Callable[[str], float]] = None  # toy tasks: response text -> reward, in the driver
    text: str = ""  # the prompt as the model sees it (samples.jsonl)
    data_source: str = ""
    ground_truth: str = ""
    extra_info: Optional[dict] = None


@dataclass
class Scores:
    """A batch's rewards, in response order, and what scoring them cost."""

    rewards: list[float]
    extras: list[dict]
    timeouts: int = 0
    errors: int = 0
    first_error: Optional[str] = None
    seconds: float = 0.0

    def metrics(self) -> dict:
        """What a metrics row gets: counts, time, and the mean of each extra number a reward function returned."""
        out = {"reward_timeouts": float(self.timeouts), "reward_errors": float(self.errors),
               "reward_score_s": self.seconds}
        keys = sorted({k for e in self.extras for k in e})
        for k in keys:
            values = [e[k] for e in self.extras if k in e]
            out[f"reward_extra/{k}"] = sum(values) / len(values)
        return out


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
        return self._items([self.task.sample(self.rng) for _ in range(self.batch_size)])

    def _items(self, prompts) -> list[Item]:
        return [Item(self.tok(p.text).input_ids, lambda text, p=p: self.task.reward(p, text), text=p.text,
                     data_source=self.task.name, ground_truth=p.answer) for p in prompts]

    def validation_items(self, cfg: Config) -> list[Item]:
        """A fixed set of the task's prompts (an RNG of its own: the training draws are not disturbed)."""
        rng = random.Random(f"grpo.val:{cfg.train.seed}")
        return self._items([self.task.sample(rng) for _ in range(cfg.data.val_max_prompts or 32)])

    def score(self, items: list[Item], texts: list[str]) -> Scores:
        """`texts` holds the responses in order, len(texts) // len(items) per item."""
        t0, per = time.perf_counter(), len(texts) // len(items)
        rewards = [float(items[i // per].score(t)) for i, t in enumerate(texts)]
        return Scores(rewards, [{}] * len(texts), seconds=time.perf_counter() - t0)

    def response_text(self, c: Completion) -> str:
        ids = c.token_ids[:-1] if c.finish_reason == "stop" else c.token_ids
        return self.tok.decode(ids, skip_special_tokens=False)

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        self.rng.setstate(state["rng"])


class DatasetSource:
    """Prompts from parquet/jsonl files in verl's layout, epoch by epoch in a seeded order; rewards by each row's
    data source (GSM8K `####`, MATH `\\boxed{}`) or the user's function (reward.function), scored in a pool of
    worker processes (grpo.scoring)."""

    def __init__(self, cfg: Config, tokenizer):
        from grpo.data import load_prompts
        from grpo.rewards import reward_fn_for
        from grpo.scoring import ScoringPool

        self.tok, self.cfg = tokenizer, cfg
        prompts = load_prompts(cfg.data.train_path, tokenizer=tokenizer, max_prompt_len=cfg.data.max_prompt_len)
        print(prompts.report, flush=True)
        if not cfg.reward.function:
            for s in prompts.data_sources:  # an unknown source fails here, before any step
                reward_fn_for(s, gsm8k=cfg.reward.gsm8k)
        self.batches = prompts.batches(batch_size=cfg.data.prompts_per_step, seed=cfg.train.seed)
        r = cfg.reward
        self.pool = ScoringPool(function=r.function, gsm8k=r.gsm8k, workers=r.workers, timeout_s=r.timeout_s)

    @staticmethod
    def _item(x) -> Item:
        return Item(x.prompt_ids, text=x.text, data_source=x.data_source, ground_truth=x.ground_truth,
                    extra_info=x.extra_info)

    def next_batch(self) -> list[Item]:
        return [self._item(x) for x in next(self.batches)]

    def validation_items(self, cfg: Config) -> list[Item]:
        """The prompts of data.val_path (every one, or the first data.val_max_prompts), in file order."""
        from grpo.data import load_prompts

        prompts = load_prompts(cfg.data.val_path, tokenizer=self.tok, max_prompt_len=cfg.data.max_prompt_len)
        print(f"validation: {prompts.report}", flush=True)
        items = list(prompts)[:cfg.data.val_max_prompts or None]
        return [self._item(x) for x in items]

    def score(self, items: list[Item], texts: list[str]) -> Scores:
        """`texts` holds the responses in order, len(texts) // len(items) per item; scored in the pool."""
        t0, per = time.perf_counter(), len(texts) // len(items)
        tasks = [(it.data_source, t, it.ground_truth, it.extra_info)
                 for i, t in enumerate(texts) for it in (items[i // per],)]
        rewards, extras, stats = self.pool.score(tasks)
        if stats["errors"] == len(texts):  # every response failed: a broken scorer, not a bad batch
            raise RuntimeError(f"every response of the batch failed to score: {stats['first_error']}")
        if stats["first_error"]:
            print(f"reward: {stats['timeouts']} timeout(s), {stats['errors']} error(s) in {len(texts)} "
                  f"responses, e.g. {stats['first_error']}", file=sys.stderr, flush=True)
        return Scores(rewards, extras, stats["timeouts"], stats["errors"], stats["first_error"],
                      time.perf_counter() - t0)

    def close(self) -> None:
        self.pool.close()

    def response_text(self, c: Completion) -> str:
        return self.tok.decode(c.token_ids, skip_special_tokens=True)

    def state_dict(self) -> dict:
        return self.batches.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.batches.load_state_dict(state)


def make_source(cfg: Config, tokenizer):
    return DatasetSource(cfg, tokenizer) if cfg.data.task == "dataset" else ToySource(cfg, tokenizer)
