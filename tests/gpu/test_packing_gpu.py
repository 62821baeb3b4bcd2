"""GPU: packed sequences on torch's varlen flash kernel (bf16), against the padded SDPA path of the same weights.

bf16 results differ from float32 by rounding either way, so each path is held to a float32 run of the same model:
the packed (varlen) path may be no further from it than the padded path is, within a margin. The CPU tests
(tests/unit/test_packing.py) check exact equality in float32; these check the kernel the CPU cannot run.
"""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from grpo import packing
from grpo.policy import CausalLMPolicy
from grpo.rollout import NativeEngine

pytestmark = pytest.mark.gpu

SHAPES = dict(vocab_size=503, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False, initializer_range=0.1)
FAMILIES = {"qwen2": lambda: Qwen2Config(**SHAPES), "llama": lambda: LlamaConfig(**SHAPES)}
LENGTHS = [300, 17, 129, 64, 2, 250, 33]


def rows(device):
    g = torch.Generator().manual_seed(0)
    S, L = len(LENGTHS), max(LENGTHS)
    ids = torch.randint(2, SHAPES["vocab_size"], (S, L), generator=g)
    mask = torch.zeros(S, L, dtype=torch.long)
    loss_mask = torch.zeros(S, L - 1)
    for i, n in enumerate(LENGTHS):
        mask[i, :n] = 1
        loss_mask[i, n // 4:n - 1] = 1
    return ids.to(device), mask.to(device), loss_mask.to(device)


def run(policy, ids, mask, loss_mask, *, pack):
    policy.zero_grad(set_to_none=True)
    logp, ent = policy(ids, mask, loss_mask, pack=pack)
    (-(logp * loss_mask).sum() / loss_mask.sum() - 0.01 * (ent * loss_mask).sum() / loss_mask.sum()).backward()
    grads = torch.cat([p.grad.float().flatten() for p in policy.parameters()])
    return logp.detach().float(), grads


@pytest.mark.parametrize("family", list(FAMILIES))
def test_varlen_packed_is_as_close_to_float32_as_padded(family):
    device = torch.device("cuda")
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(FAMILIES[family](), attn_implementation="sdpa").to(device)
    ids, mask, loss_mask = rows(device)
    truth, g_truth = run(CausalLMPolicy(lm), ids, mask, loss_mask, pack=False)
    lm = copy.deepcopy(lm).to(torch.bfloat16)
    policy = CausalLMPolicy(lm)
    padded, g_padded = run(policy, ids, mask, loss_mask, pack=False)
    packed, g_packed = run(policy, ids, mask, loss_mask, pack=True)
    assert lm.config._attn_implementation == packing.VARLEN, "the packed bf16 forward did not take the varlen kernel"
    sel = loss_mask.bool()
    err_padded, err_packed = (padded - truth)[sel].abs(), (packed - truth)[sel].abs()
    assert err_packed.mean() <= 1.5 * err_padded.mean() + 1e-3, (err_packed.mean(), err_padded.mean())
    assert err_packed.max() <= 1.5 * err_padded.max() + 1e-2, (err_packed.max(), err_padded.max())
    rel = lambda g: float((g - g_truth).norm() / g_truth.norm())  # noqa: E731
    assert rel(g_packed) <= 1.5 * rel(g_padded) + 1e-3, (rel(g_packed), rel(g_padded))
    # and packing confines attention: the same rows in another order give the same log-probs
    order = torch.tensor([3, 0, 6, 2, 5, 1, 4], device=device)
    shuffled, _ = run(policy, ids[order], mask[order], loss_mask[order], pack=True)
    assert (shuffled - packed[order])[sel[order]].abs().max() < 0.05


def test_engine_packed_prefill_on_varlen():
    """The native engine's packed prefill in bf16 (varlen kernel): the first sampled token's log-prob is as close
    to a float32 forward of the prompt alone as transformers' own bf16 forward is."""
    device = torch.device("cuda")
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(FAMILIES["qwen2"](), attn_implementation="sdpa").to(device)
    prompts = [torch.randint(2, 503, (n,)).tolist() for n in (200, 3, 77, 128)]
    lm16 = copy.deepcopy(lm).to(torch.bfloat16)
    engine = NativeEngine(lm16, pad_id=0, eos_id=1, max_new_tokens=1, cuda_graphs=False,
                          compile=False)
    out = engine.generate(prompts, n=2, seed=0)
    errs, base = [], []
    with torch.no_grad():
        for prompt, group in zip(prompts, out):
            x = torch.tensor([prompt], device=device)
            want = torch.log_softmax(lm(x).logits[0, -1].double(), -1)
            bf16 = torch.log_softmax(lm16(x).logits[0, -1].double(), -1)
            for c in group:
                errs.append(abs(c.logprobs[0] - float(want[c.token_ids[0]])))
                base.append(abs(float(bf16[c.token_ids[0]] - want[c.token_ids[0]])))
    assert max(errs) <= 1.5 * max(base) + 2e-2, (errs, base)
