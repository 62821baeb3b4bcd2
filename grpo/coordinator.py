"""The trainers' side of the rollouts: prompts out, completions back, rewards, group advantages, each trainer
rank's rows. It can hold one request in flight (the off-policy layout: the engines generate batch k+1 while the
trainers update on batch k).

Every trainer rank calls the same methods in the same order; only the driver (trainer rank 0) draws prompts, scores
and computes advantages, and the batch reaches the other trainer ranks over their gloo group.
"""

from __future__ import annotations

import time
from collections import deque

import torch
import torch.distributed as dist

from grpo.batch import Batch, make_batch
from grpo.channel import Channel, End, Generate, Sync
from grpo.rollout import Completion


class Rollouts:
    def __init__(self, cfg, channel: Channel, *, trainers: list[int], source, pad_id: int, device: torch.device,
                 advantage_fn, train_obj_group):
        self.cfg, self.channel, self.trainers = cfg, channel, trainers
        self.rank = dist.get_rank()
        self.driver = self.rank == trainers[0]
        self.source, self.pad_id, self.device = source, pad_id, device
        self.advantage_fn, self.obj_group = advantage_fn, train_obj_group
        self.in_flight: deque = deque()  # driver: (step, items) posted, not yet gathered
        self.states: deque = deque()  # driver: the data position before each batch drawn and not yet trained on

    # --- rounds of the control protocol (every trainer rank calls each) ---

    def request(self, step: int) -> None:
        """Post the prompts of `step` to the engines (the driver draws them)."""
        if not self.driver:
            self.channel.receive()
            return
        self.states.append(self.source.state_dict())
        items = self.source.next_batch()
        self.in_flight.append((step, items))
        self.channel.post(Generate([x.prompt_ids for x in items], self.cfg.rollout.n, step))

    def collect(self) -> tuple[Batch, dict]:
        """The oldest request's completions: scored, advantages computed, this trainer rank's rows on the device."""
        if not self.driver:
            self.channel.reply(None)
            batch, info = None, {}
        else:
            t0 = time.perf_counter()
            replies = self.channel.gather()
            step, items = self.in_flight.popleft()
            batch, info = self.score(items, replies)
            info["rollout_wait_s"] = time.perf_counter() - t0
            info["weights_age"] = step - 1 - replies[0][1]["weights_version"]  # optimizer steps behind
        dp = len(self.trainers)
        if dp > 1:
            box = [batch]
            dist.broadcast_object_list(box, src=self.trainers[0], group=self.obj_group)
            batch = box[0]
        share = len(batch) // dp
        i = self.trainers.index(self.rank)
        return batch.rows(i * share, (i + 1) * share).to(self.device), info

    def sync(self, version: int) -> str | None:
        """Announce a weight sync of the weights after `version` updates (the caller sends it right after).
        Returns the stop agreed in this round."""
        if self.driver:
            return self.channel.post(Sync(version))
        self.channel.receive()
        return self.channel.halt

    def end(self, status: str) -> None:
        if self.driver:
            self.channel.post(End(status))
        else:
            self.channel.receive()

    # --- the driver's bookkeeping ---

    def trained(self) -> None:
        """The oldest drawn batch has been trained on: a checkpoint now resumes after it."""
        if self.driver:
            self.states.popleft()

    def data_state(self):
        """The data position a checkpoint resumes from: before the oldest batch not yet trained on (a batch in
        flight when the run stops is drawn again on resume)."""
        return self.states[0] if self.states else self.source.state_dict()

    def score(self, items, replies) -> tuple[Batch, dict]:
        cfg = self.cfg
        groups_out = reassemble([r[0] for r in replies], len(items))
        stats = [r[1] for r in replies]
        info = {"generate_s": max(s["generate_s"] for s in stats),  # the slowest engine sets the pace
                "gen_start_s": min(s["t0"] for s in stats), "gen_end_s": max(s["t1"] for s in stats)}
        if "gpu_peak_gib" in stats[0]:
            info["engine_peak_gib"] = max(s["gpu_peak_gib"] for s in stats)
        if "device_used_gib" in stats[0]:  # the whole GPU, engine and whatever shares it, as generation ends
            info["gen_device_used_gib"] = max(s["device_used_gib"] for s in stats)
        rewards = torch.tensor([x.score(self.source.response_text(c))
                                for x, group in zip(items, groups_out) for c in group], dtype=torch.float32)
        adv = self.advantage_fn(rewards.to(self.device), cfg.rollout.n, eps=cfg.algo.adv_eps,
                                norm_by_std=cfg.algo.norm_adv_by_std, leave_one_out=cfg.algo.leave_one_out).cpu()
        prompt_ids = [x.prompt_ids for x in items]
        batch = make_batch(prompt_ids, groups_out, adv, pad_id=self.pad_id)
        lengths = [len(c.token_ids) for group in groups_out for c in group]
        info |= {"reward": rewards.mean().item(), "reward_std": rewards.std().item(),
                 "response_len": sum(lengths) / len(lengths),
                 "stop_frac": sum(c.finish_reason == "stop" for g in groups_out for c in g) / len(lengths)}
        return batch, info


def reassemble(per_engine: list[list[list[Completion]]], num_prompts: int) -> list:
    """Engine k got prompts k, k+E, k+2E, ...; put their groups back in prompt order."""
    out = [None] * num_prompts
    for k, groups in enumerate(per_engine):
        for j, group in enumerate(groups):
            out[k + j * len(per_engine)] = group
    return out
