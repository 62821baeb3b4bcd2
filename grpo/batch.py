"""Turn prompts and sampled responses into the padded tensors the trainer consumes, and group rows into
micro-batches (padded: by padded tokens; packed: by real tokens)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from grpo.rollout import Completion


@dataclass
class Batch:
    input_ids: torch.Tensor  # [S, L] prompt + response, right-padded
    attention_mask: torch.Tensor  # [S, L]
    loss_mask: torch.Tensor  # [S, L-1] 1 where target token t+1 is a response token
    advantages: torch.Tensor  # [S]
    rollout_logp: torch.Tensor  # [S, L-1] the engine's log-probs, at loss_mask positions
    old_logp: torch.Tensor | None = None  # [S, L-1] the trainer's, before the update
    ref_logp: torch.Tensor | None = None  # [S, L-1] the reference policy's
    advantages_tok: torch.Tensor | None = None  # [S, L-1] per-token advantages, when the rollout correction weighs them

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def fields(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in vars(self).items() if v is not None}

    def rows(self, start: int, stop: int) -> "Batch":
        return Batch(**{k: v[start:stop] for k, v in self.fields().items()})

    def select(self, index: torch.Tensor) -> "Batch":
        return Batch(**{k: v[index] for k, v in self.fields().items()})

    def trim(self) -> "Batch":
        """Drop the padding columns that no row of this batch uses."""
        width = max(int(self.attention_mask.sum(1).max()), 2)
        return Batch(**{k: v if v.dim() == 1 else v[:, :width - (k not in ("input_ids", "attention_mask"))]
                        for k, v in self.fields().items()})

    def to(self, device) -> "Batch":
        return Batch(**{k: v.to(device, non_blocking=True) for k, v in self.fields().items()})


def split_by_tokens(lengths: list[int], budget: int) -> list[list[int]]:
    """Rows grouped into micro-batches of at most `budget` padded tokens (rows x longest row).

    Rows are taken shortest first, so each micro-batch holds rows of similar length and little padding; a row
    longer than the budget gets a micro-batch of its own. budget <= 0: one micro-batch.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    if budget <= 0:
        return [order]
    groups, current, longest = [], [], 0
    for i in order:
        if current and (len(current) + 1) * max(longest, lengths[i]) > budget:
            groups.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, lengths[i])
    if current:
        groups.append(current)
    return groups


def pack_by_tokens(lengths: list[int], budget: int, *, min_count: int = 1) -> list[list[int]]:
    """Rows grouped into micro-batches of at most `budget` real tokens each (packed: no padding counted), as few as
    that allows but at least `min_count`, with the tokens spread evenly over them.

    Longest first, each row into the micro-batch with the fewest tokens so far (LPT): the micro-batches come out
    nearly equal, so no one of them sets the step's pace or its memory peak. A row longer than the budget gets a
    micro-batch of its own. Rows inside a micro-batch keep their batch order. budget <= 0: no limit. Groups are
    empty where there are fewer rows than `min_count`.
    """
    # the fewest possible: one for each row over the budget, and the rest's tokens in full micro-batches
    over = [n for n in lengths if n > budget] if budget > 0 else []
    fewest = len(over) + -(-(sum(lengths) - sum(over)) // budget) if budget > 0 else 1
    count = max(min_count, 1, fewest)
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    while True:
        groups, loads = [[] for _ in range(count)], [0] * count
        for i in order:
            j = min(range(count), key=loads.__getitem__)
            groups[j].append(i)
            loads[j] += lengths[i]
        if budget <= 0 or all(load <= budget or len(g) == 1 for g, load in zip(groups, loads)):
            return [sorted(g) for g in groups]
        count += 1


def make_batch(prompt_ids: list[list[int]], groups: list[list[Completion]], advantages: torch.Tensor,
               *, pad_id: int) -> Batch:
    """One row per (prompt, sample), in group order: row i*n+j is sample j of prompt i."""
    rows = [(p, c) for p, group in zip(prompt_ids, groups) for c in group]
    width = max(len(p) + len(c.token_ids) for p, c in rows)
    S = len(rows)
    input_ids = torch.full((S, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((S, width), dtype=torch.long)
    loss_mask = torch.zeros((S, width - 1), dtype=torch.float32)
    rollout_logp = torch.zeros((S, width - 1), dtype=torch.float32)
    for i, (p, c) in enumerate(rows):
        seq = p + c.token_ids
        input_ids[i, :len(seq)] = torch.tensor(seq)
        attention_mask[i, :len(seq)] = 1
        # response token k sits at position len(p)+k and is predicted from position len(p)+k-1
        start, stop = len(p) - 1, len(seq) - 1
        loss_mask[i, start:stop] = 1
        rollout_logp[i, start:stop] = torch.tensor(c.logprobs, dtype=torch.float32)
    return Batch(input_ids, attention_mask, loss_mask, advantages.float(), rollout_logp)
