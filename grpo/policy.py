"""The policy: a Hugging Face causal LM whose forward returns per-token log-probs (and entropy), sharded by FSDP2.

The forward never builds [tokens, vocab] logits in the loop: it takes the final hidden states of the response
positions and the LM head's weight and hands them to the log-prob kernel.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from kernels import fused_logprob_ref
from grpo.config import ModelConfig
from grpo.tiny import build_tiny_model

PREFIX = "lm."


class CausalLMPolicy(nn.Module):
    """Wraps `lm` so that the FSDP2 root owns the embeddings, the final norm and the LM head."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, attention_mask, loss_mask, *, temperature: float = 1.0):
        """Log-prob and entropy of each target token, as [B, L-1] tensors (0 where `loss_mask` is 0).

        Position t predicts token t+1; `loss_mask` is [B, L-1] and selects the response tokens.
        """
        hidden = self.lm.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        sel = loss_mask.bool()
        logp, entropy = fused_logprob_ref(
            hidden[:, :-1][sel], self.lm.lm_head.weight, input_ids[:, 1:][sel],
            temperature=temperature, return_entropy=True,
        )
        logp_BT = torch.zeros(sel.shape, dtype=torch.float32, device=hidden.device).masked_scatter(sel, logp)
        ent_BT = torch.zeros(sel.shape, dtype=torch.float32, device=hidden.device).masked_scatter(sel, entropy)
        return logp_BT, ent_BT


def build_lm(cfg: ModelConfig, seed: int) -> nn.Module:
    if cfg.path == "tiny":
        return build_tiny_model(seed)
    raise ValueError(f"model.path={cfg.path!r}: only the built-in 'tiny' model is supported so far")


def hf_named_parameters(policy: CausalLMPolicy) -> list[tuple[str, torch.Tensor]]:
    """Parameters under their Hugging Face checkpoint names, in module order (the same on every rank)."""
    return [(name.removeprefix(PREFIX), p) for name, p in policy.named_parameters()]


def apply_fsdp(policy: CausalLMPolicy, mesh, *, param_dtype: torch.dtype) -> CausalLMPolicy:
    """FSDP2: one group per transformer block, then the root (embeddings, norm, LM head)."""
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in policy.lm.model.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(policy, mesh=mesh, mp_policy=mp)
    return policy


def build_policy(cfg: ModelConfig, mesh, *, seed: int, trainable: bool, device: torch.device) -> CausalLMPolicy:
    policy = CausalLMPolicy(build_lm(cfg, seed)).to(device)
    if not trainable:
        policy.requires_grad_(False).eval()
    return apply_fsdp(policy, mesh, param_dtype=getattr(torch, cfg.dtype))
