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
        self.samples: list[dict] = []  # driver: a few (prompt, response, reward) of the latest scored batch

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
        texts = [self.source.response_text(c) for group in groups_out for c in group]
        scores = self.source.score(items, texts)
        rewards = torch.tensor(scores.rewards, dtype=torch.float32)
        adv = self.advantage_fn(rewards.to(self.device), cfg.rollout.n, eps=cfg.algo.adv_eps,
                                norm_by_std=cfg.algo.norm_adv_by_std, leave_one_out=cfg.algo.leave_one_out).cpu()
        prompt_ids = [x.prompt_ids for x in items]
        batch = make_batch(prompt_ids, groups_out, adv, pad_id=self.pad_id)
        lengths = [len(c.token_ids) for group in groups_out for c in group]
        info |= {"reward": rewards.mean().item(), "reward_std": rewards.std().item(),
                 "response_len": sum(lengths) / len(lengths),
                 "stop_frac": sum(c.finish_reason == "stop" for g in groups_out for c in g) / len(lengths)}
        info |= batch_stats(rewards, adv, lengths, [len(p) for p in prompt_ids], cfg.rollout.n,
                            cfg.rollout.max_new_tokens) | scores.metrics()
        self.samples = pick_samples(items, texts, scores.rewards, cfg.track.samples_per_step)
        return batch, info

    def validate(self, step: int, items, count: int) -> dict:
        """Generate for the `count` validation prompts with the weights the engines hold (greedy when data.val_n
        is 1) and score them: the mean reward per data source, as verl's test_freq validation. Every trainer rank
        calls it (with the same count), at a step boundary with no request in flight; the driver returns the
        metrics, the others {}. The prompts go out in rounds of at most a training batch's responses: the engines'
        memory (the native engine's static KV cache) was planned for that many."""
        n = self.cfg.data.val_n
        per_round = max(1, self.cfg.data.prompts_per_step * self.cfg.rollout.n // n)
        if not self.driver:
            for _ in range(0, count, per_round):
                self.channel.receive()
                self.channel.reply(None)
            return {}
        assert not self.in_flight, "validation between a posted request and its collection"
        t0 = time.perf_counter()
        groups_out = []
        for start in range(0, count, per_round):
            chunk = items[start:start + per_round]
            # a seed space of its own, so validation draws never repeat a training step's
            seed = VAL_SEED + step * 1000 + start // per_round
            self.channel.post(Generate([x.prompt_ids for x in chunk], n, seed, temperature=0.0 if n == 1 else None))
            groups_out += reassemble([r[0] for r in self.channel.gather()], len(chunk))
        texts = [self.source.response_text(c) for group in groups_out for c in group]
        scores = self.source.score(items, texts)
        by_source: dict[str, list[float]] = {}
        for i, r in enumerate(scores.rewards):
            by_source.setdefault(items[i // n].data_source, []).append(r)
        out = {"step": step, "val/reward": sum(scores.rewards) / len(scores.rewards), "val/n": n,
               "val/prompts": len(items), "val/s": time.perf_counter() - t0,
               "val/response_len": sum(len(c.token_ids) for g in groups_out for c in g) / len(texts),
               "val/reward_timeouts": float(scores.timeouts)}
        extras: dict[str, list[float]] = {}  # a reward function's other numbers, per data source (verl's "acc", ...)
        for i, extra in enumerate(scores.extras):
            for key, value in extra.items():
                extras.setdefault(f"val/{items[i // n].data_source}/{key}", []).append(value)
        out |= {k: sum(v) / len(v) for k, v in sorted(extras.items())}
        for source, values in sorted(by_source.items()):
            out[f"val/{source}/reward"] = sum(values) / len(values)
            if n > 1:  # verl's best@n: the share of prompts with at least one right answer (reward > 0 here)
                groups = [values[j:j + n] for j in range(0, len(values), n)]
                out[f"val/{source}/reward_best"] = sum(max(g) for g in groups) / len(groups)
        return out


VAL_SEED = 10**8  # validation seeds: far above any training step's, small enough for vLLM's int64 seeds


def batch_stats(rewards: torch.Tensor, adv: torch.Tensor, lengths: list[int], prompt_lengths: list[int], n: int,
                max_new_tokens: int) -> dict:
    """The batch statistics verl and TRL users look at: reward range, the share of groups whose rewards are all
    equal (TRL's frac_reward_zero_std: they teach nothing), advantages, response and prompt lengths, tokens."""
    groups = rewards.view(-1, n)
    zero_std = (groups.max(dim=1).values == groups.min(dim=1).values).float().mean().item()
    total = sum(lengths) + n * sum(prompt_lengths)
    return {"reward_max": rewards.max().item(), "reward_min": rewards.min().item(), "frac_reward_zero_std": zero_std,
            "adv_mean": adv.mean().item(), "adv_max": adv.max().item(), "adv_min": adv.min().item(),
            "response_len_max": float(max(lengths)), "response_len_min": float(min(lengths)),
            "response_clip_frac": sum(x >= max_new_tokens for x in lengths) / len(lengths),
            "prompt_len": sum(prompt_lengths) / len(prompt_lengths), "num_tokens": float(total)}


def pick_samples(items, texts: list[str], rewards: list[float], count: int) -> list[dict]:
    """The first response of each of the first `count` prompts: prompt, response, reward."""
    per = len(texts) // len(items)
    return [{"prompt": items[i].text, "response": texts[i * per], "reward": rewards[i * per],
             "data_source": items[i].data_source, "ground_truth": items[i].ground_truth}
            for i in range(min(count, len(items)))]


def reassemble(per_engine: list[list[list[Completion]]], num_prompts: int) -> list:
    """Engine k got prompts k, k+E, k+2E, ...; put their groups back in prompt order."""
    out = [None] * num_prompts
    for k, groups in enumerate(per_engine):
        for j, group in enumerate(groups):
            out[k + j * len(per_engine)] = group
    return out
