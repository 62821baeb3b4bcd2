"""Toy tasks for the `local` preset: prompts the tiny tokenizer can spell, and rewards with partial credit.

A random policy earns a little reward now and then (a matching digit here and there), so every GRPO group has some
signal from the first step; a policy that learns the task earns 1.0.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Prompt:
    text: str
    answer: str  # the ground truth, as the response should spell it


def positional_credit(answer: str, response: str) -> float:
    """Fraction of answer words matched at their position, divided by the longer of the two lengths.

    Extra words cost as much as missing ones, so full credit needs the answer and then the end of the sequence.
    """
    want, got = answer.split(), response.split()
    hits = sum(a == b for a, b in zip(want, got))
    return hits / max(len(want), len(got), 1)


class RepeatTask:
    """`repeat 7 :` -> `7 7 7 7`: say the prompt's digit `times` times, then stop."""

    name = "repeat"

    def __init__(self, times: int = 4):
        self.times = times

    def sample(self, rng: random.Random) -> Prompt:
        d = str(rng.randrange(10))
        return Prompt(text=f"repeat {d} :", answer=" ".join([d] * self.times))

    def reward(self, prompt: Prompt, response: str) -> float:
        return positional_credit(prompt.answer, response)


class CopyTask:
    """`copy 3 1 4 :` -> `3 1 4`: copy the digits, then stop. Harder than repeat: each position differs."""

    name = "copy"

    def __init__(self, length: int = 3):
        self.length = length

    def sample(self, rng: random.Random) -> Prompt:
        digits = " ".join(str(rng.randrange(10)) for _ in range(self.length))
        return Prompt(text=f"copy {digits} :", answer=digits)

    def reward(self, prompt: Prompt, response: str) -> float:
        return positional_credit(prompt.answer, response)


TASKS = {"repeat": RepeatTask, "copy": CopyTask}


def make_task(name: str):
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]()
