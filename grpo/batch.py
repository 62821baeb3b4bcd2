"""Turn prompts and sampled responses into the padded tensors the trainer consumes."""

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

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def rows(self, start: int, stop: int) -> "Batch":
        return Batch(*(t[start:stop] for t in self.tensors()))

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.input_ids, self.attention_mask, self.loss_mask, self.advantages, self.rollout_logp

    def to(self, device) -> "Batch":
        return Batch(*(t.to(device, non_blocking=True) for t in self.tensors()))


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
