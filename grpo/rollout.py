"""Rollout engines. Every engine returns `Completion`s and takes new weights through `load_weights`.

The native engine runs a Hugging Face causal LM with sampling; the vLLM engine (the `vllm` extra) comes later with
the same interface.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch


@dataclass
class Completion:
    token_ids: list[int]  # the response, ending with EOS when finish_reason == "stop"
    logprobs: list[float]  # the engine's log-prob of each response token (for a train/rollout mismatch check)
    finish_reason: str  # "stop" (EOS) or "length"


class NativeEngine:
    """Sampling with transformers' `generate`; one batch holds every sample of every prompt."""

    def __init__(self, model, *, pad_id: int, eos_id: int, max_new_tokens: int, temperature: float = 1.0):
        self.model = model.eval()
        self.pad_id, self.eos_id = pad_id, eos_id
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], n: int, seed: int) -> list[list[Completion]]:
        """Sample `n` responses per prompt. Returns one list of `n` completions per prompt."""
        if not prompts:
            return []
        rows = [p for p in prompts for _ in range(n)]
        width = max(len(p) for p in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(rows):  # left padding: every row's next token is at the same column
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        torch.manual_seed(seed)
        out = self.model.generate(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            do_sample=True,
            temperature=self.temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=self.max_new_tokens,
            pad_token_id=self.pad_id,
            eos_token_id=self.eos_id,
            return_dict_in_generate=True,
            output_logits=True,
        )
        new = out.sequences[:, width:].cpu()
        logits = torch.stack(out.logits, dim=1).float().cpu()  # [rows, steps, V], raw (before temperature)
        logp = torch.log_softmax(logits / self.temperature, dim=-1)
        token_logp = logp.gather(-1, new.unsqueeze(-1)).squeeze(-1)
        results = []
        for i in range(len(rows)):
            toks = new[i].tolist()
            if self.eos_id in toks:
                end, reason = toks.index(self.eos_id) + 1, "stop"
            else:
                end, reason = len(toks), "length"
            results.append(Completion(toks[:end], token_logp[i, :end].tolist(), reason))
        return [results[i * n:(i + 1) * n] for i in range(len(prompts))]

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Copy named tensors (Hugging Face names) into the model; returns how many were loaded."""
        params = dict(self.model.named_parameters())
        count = 0
        for name, tensor in weights:
            if name not in params:
                raise KeyError(f"engine has no parameter {name!r}")
            params[name].copy_(tensor)
            count += 1
        return count
