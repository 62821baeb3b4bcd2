"""Packed micro-batches over three real trainer processes (gloo): every rank runs the same number of micro-batches
(FSDP2's collectives must pair up), each holds at most the budget of real tokens, and every row is used once, even
when the ranks' rows differ in number and length so much that one rank alone would need far fewer."""

import json

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from grpo.batch import Batch
from grpo.config import Config, TrainConfig
from grpo.train_step import Ranks, micro_batches

BUDGET = 100
LENGTHS = {0: [90, 80, 70, 60, 50, 40, 30, 20, 10, 5], 1: [12, 9, 7], 2: [100, 100, 100, 99, 1, 1, 250]}


def rows(lengths):
    S, L = len(lengths), max(lengths)
    mask = torch.zeros(S, L, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    zeros = torch.zeros(S, L - 1)
    return Batch(input_ids=mask.clone(), attention_mask=mask, loss_mask=zeros, advantages=torch.zeros(S),
                 rollout_logp=zeros)


def worker(rank: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=3)
    try:
        cfg = Config(train=TrainConfig(max_tokens_per_gpu=BUDGET, pack=True))
        group = dist.new_group(backend="gloo")
        groups = micro_batches(rows(LENGTHS[rank]), cfg, Ranks(dp=3, train=group, obj=group))
        with open(f"{out}.{rank}", "w") as f:
            json.dump([g.tolist() for g in groups], f)
    finally:
        dist.destroy_process_group()


def test_every_rank_runs_the_same_number_of_packed_micro_batches(tmp_path):
    out = str(tmp_path / "groups")
    mp.spawn(worker, args=(str(tmp_path / "init"), out), nprocs=3, join=True)
    counts = []
    for rank, lengths in LENGTHS.items():
        groups = json.loads((tmp_path / f"groups.{rank}").read_text())
        counts.append(len(groups))
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
        loads = [sum(lengths[i] for i in g) for g in groups]
        assert all(load <= BUDGET or len(g) == 1 for g, load in zip(groups, loads)), (rank, loads)
    assert len(set(counts)) == 1, counts
    # rank 0 needs 5 micro-batches of 100 real tokens (455 tokens), rank 2 needs 6 (the 250-token row alone), rank 1
    # one: all run 6 (rank 1 with empty ones), not one micro-batch per row as a padded budget would give rank 2
    assert counts[0] == 6
