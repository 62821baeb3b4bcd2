"""The control protocol between the driver (trainer rank 0) and every other rank, both sides in one class.

Each round is two small collectives on a gloo group that spans every rank of the job: an all-reduce of the ranks'
stop flags (a signal on any rank is seen by all, at the same round), then a broadcast of the driver's message.
The driver posts, every other rank receives the same message in the same round, so the sides cannot drift apart:

    Generate(prompts, n, seed[, temperature])
                                 engine leaders generate their share, then `reply`; the driver `gather`s
                                 (temperature None: the engine's own; validation sends 0 for greedy)
    Sync(version)                the engines take one weight sync (the trainers send it right after posting):
                                 the weights after `version` optimizer updates
    End(status)                  the run is over ("done", or the stop status that ended it)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from grpo import stop

STOP_CODES = {None: 0, "stop": 1, "requeue": 2}


@dataclass(frozen=True)
class Generate:
    prompts: list[list[int]]
    n: int
    seed: int
    temperature: float | None = None  # None: the engine's own sampling settings


@dataclass(frozen=True)
class End:
    status: str


@dataclass(frozen=True)
class Sync:
    version: int


class Channel:
    def __init__(self, group, *, driver: int, engine_leaders: list[int]):
        self.group, self.driver, self.leaders = group, driver, engine_leaders
        self.rank = dist.get_rank()
        self.halt: str | None = None  # the stop agreed in the latest round

    def _round(self, msg):
        flag = torch.tensor([STOP_CODES[stop.requested()]])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        self.halt = {v: k for k, v in STOP_CODES.items()}[int(flag)]
        box = [msg]
        dist.broadcast_object_list(box, src=self.driver, group=self.group)
        return box[0]

    def post(self, msg) -> str | None:
        """Driver: send `msg` to every rank. Returns the stop agreed in this round (None: go on)."""
        assert self.rank == self.driver
        self._round(msg)
        return self.halt

    def receive(self):
        """Every rank but the driver: the driver's message of this round."""
        return self._round(None)

    def reply(self, result) -> None:
        """Engine leaders (and every other non-driver rank, with None): answer the latest Generate."""
        dist.gather_object(result, None, dst=self.driver, group=self.group)

    def gather(self) -> list:
        """Driver: the engine leaders' replies, in engine order."""
        out = [None] * dist.get_world_size(self.group)
        dist.gather_object(None, out, dst=self.driver, group=self.group)
        return [out[r] for r in self.leaders]

    def broadcast(self, obj, src: int):
        """A one-off object from `src` to every rank (start-up: the sync specs and address)."""
        box = [obj]
        dist.broadcast_object_list(box, src=src, group=self.group)
        return box[0]
