"""Packed sequences against the padded path they replace: per-token log-probs, entropy and gradients of a packed
micro-batch equal the padded ones (float32, 1e-5) for every model family, with LoRA and without; a whole
`train_step` gives the same metrics and weights packed and padded; the packed micro-batches keep to a budget of real
tokens; the native engine's packed prefill writes the KV cache a plain forward computes.

A new model family joins by adding its tiny config to FAMILIES.
"""

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from transformers import (AutoModelForCausalLM, DynamicCache, LlamaConfig, MistralConfig, Qwen2Config,
                          Qwen3Config)

from grpo.batch import make_batch, pack_by_tokens
from grpo.config import AlgoConfig, Config, RolloutConfig, TrainConfig
from grpo.packing import block_causal_mask, pack
from grpo.policy import ALL_LINEAR, CausalLMPolicy, LoraSpec, apply_fsdp, inject_lora
from grpo.rollout import Completion, NativeEngine
from grpo.train_step import Models, micro_batches, train_step

VOCAB = 29
SHAPES = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
FAMILIES = {
    "qwen2": lambda: Qwen2Config(**SHAPES),
    "llama": lambda: LlamaConfig(**SHAPES),
    "qwen3": lambda: Qwen3Config(**SHAPES, head_dim=8),
    "mistral": lambda: MistralConfig(**SHAPES, sliding_window=None),
    # a window shorter than the sequences: transformers' packed mask must compose with the sliding one
    "mistral-window5": lambda: MistralConfig(**SHAPES, sliding_window=5),
}
LENGTHS = [13, 4, 17, 9, 2, 11]  # right-padded to 17; a 2-token row has a single target


def tiny_lm(family: str, *, lora: bool, seed: int = 0):
    torch.manual_seed(seed)
    lm = AutoModelForCausalLM.from_config(FAMILIES[family](), attn_implementation="sdpa").float()
    if lora:
        inject_lora(lm, LoraSpec(rank=4, alpha=8, targets=ALL_LINEAR))
        for name, p in lm.named_parameters():  # B = 0 (peft's init) would hide errors in the adapters' inputs
            if ".lora_" in name:
                torch.nn.init.normal_(p, std=0.1)
    return lm


def padded_rows(lengths, *, seed=1):
    g = torch.Generator().manual_seed(seed)
    S, L = len(lengths), max(lengths)
    ids = torch.randint(3, VOCAB, (S, L), generator=g)
    mask = torch.zeros(S, L, dtype=torch.long)
    loss_mask = torch.zeros(S, L - 1)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        ids[i, n:] = 0
        loss_mask[i, n // 3:n - 1] = 1  # a prompt of n // 3 tokens, then the response
    return ids, mask, loss_mask


def forward_and_grads(policy, ids, mask, loss_mask, *, pack_rows: bool):
    policy.zero_grad(set_to_none=True)
    logp, ent = policy(ids, mask, loss_mask, temperature=0.9, pack=pack_rows)
    w = torch.linspace(-1, 1, loss_mask.numel()).view_as(loss_mask)  # distinct weights: every token counts
    ((logp * w).sum() + (ent * w.flip(1)).sum() * 0.1).backward()
    grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
    return logp.detach(), ent.detach(), grads


def assert_close(got, want, what, tol=1e-5):
    diff = (got - want).abs()
    bad = int((diff > tol).sum())
    assert bad == 0, f"{what}: {bad} of {diff.numel()} differ by more than {tol}, max {diff.max():.2e}"


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_packed_equals_padded(family, lora):
    policy = CausalLMPolicy(tiny_lm(family, lora=lora))
    ids, mask, loss_mask = padded_rows(LENGTHS)
    logp, ent, grads = forward_and_grads(policy, ids, mask, loss_mask, pack_rows=False)
    p_logp, p_ent, p_grads = forward_and_grads(policy, ids, mask, loss_mask, pack_rows=True)
    assert_close(p_logp, logp, "log-probs")
    assert_close(p_ent, ent, "entropy")
    assert (logp[loss_mask == 0] == 0).all() and (p_logp[loss_mask == 0] == 0).all()
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert set(grads) == set(p_grads) == trainable
    assert all(".lora_" in n for n in trainable) == lora
    for name in grads:
        assert_close(p_grads[name], grads[name], f"gradient of {name}")
    # the padded path really differs from attending across sequences: pack the rows with one position range
    # (no restart) and the log-probs change, so the test above would catch a leak between sequences
    leaky = policy.lm(input_ids=ids[mask.bool()][None]).logits
    assert not torch.allclose(leaky[0, :LENGTHS[0] + 3], policy.lm(input_ids=ids[:1]).logits[0, :LENGTHS[0] + 3])


def test_pack_layout():
    _, mask, _ = padded_rows([3, 1, 2])
    p = pack(mask)
    assert p.position_ids.tolist() == [[0, 1, 2, 0, 0, 1]]
    assert p.cu_seqlens.tolist() == [0, 3, 4, 6] and p.max_len == 3
    assert p.index.tolist() == [0, 1, 2, 3, 6, 7]  # row-major positions in the padded [3, 3]
    assert p.slot[0].tolist() == [0, 1, 2] and p.slot[2, :2].tolist() == [4, 5]
    want = torch.tensor([[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 0, 0],
                         [0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(block_causal_mask(p.cu_seqlens, 6), want)
    assert torch.equal(block_causal_mask(p.cu_seqlens, 6, window=1), torch.eye(6, dtype=torch.bool))


# ------------------------------------------------------------------------------------ micro-batches of real tokens

@pytest.mark.parametrize("lengths, budget", [
    ([5] * 10, 20), ([100, 3, 3, 3, 50, 60, 2, 90, 7], 100), ([30, 40, 500, 12], 64), (list(range(1, 40)), 77),
])
def test_pack_by_tokens_keeps_the_budget_and_balances(lengths, budget):
    groups = pack_by_tokens(lengths, budget)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    loads = [sum(lengths[i] for i in g) for g in groups]
    assert all(load <= budget or len(g) == 1 for g, load in zip(groups, loads)), loads
    fewest = max(-(-sum(lengths) // budget), sum(n > budget for n in lengths))
    assert len(groups) <= fewest + 1, (len(groups), fewest)
    small = [load for g, load in zip(groups, loads) if not (len(g) == 1 and load > budget)]
    assert max(small) - min(small) <= max(lengths), loads  # LPT: within one row of each other
    assert all(g == sorted(g) for g in groups)


def test_pack_by_tokens_min_count_and_no_budget():
    assert pack_by_tokens([4, 4, 4], 0) == [[0, 1, 2]]
    groups = pack_by_tokens([4, 4], 100, min_count=3)  # another rank needs 3: one micro-batch stays empty
    assert sorted(map(len, groups)) == [0, 1, 1]


def cfg_for(*, pack_rows: bool, budget: int, mini_batches: int = 1, kl: float = 0.01, agg="token-mean"):
    return Config(rollout=RolloutConfig(n=3, max_new_tokens=12, temperature=1.0),
                  algo=AlgoConfig(kl_coef=kl, kl_kind="low_var_kl", agg=agg, entropy_coef=0.01),
                  train=TrainConfig(lr=1.0, mini_batches=mini_batches, max_tokens_per_gpu=budget, pack=pack_rows))


def grpo_batch(seed=0):
    """4 prompts x 3 responses of uneven lengths, as the coordinator builds them."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (3, 7, 2, 5)]
    groups = [[Completion(torch.randint(3, VOCAB, (n,), generator=g).tolist(),
                          (-torch.rand(n, generator=g)).tolist(), "stop") for n in lens]
              for lens in ([12, 1, 6], [3, 9, 4], [11, 2, 7], [5, 12, 8])]
    adv = torch.randn(12, generator=g)
    return make_batch(prompts, groups, adv, pad_id=0)


@pytest.fixture(scope="module")
def mesh():
    """A one-rank gloo FSDP2 mesh in this process: train_step runs on FSDP2 modules, as in the loop."""
    owner = not dist.is_initialized()
    if owner:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield init_device_mesh("cpu", (1,))
    if owner:
        dist.destroy_process_group()


@pytest.mark.parametrize("budget, mini_batches, agg", [
    (0, 1, "token-mean"), (40, 1, "token-mean"), (40, 2, "seq-mean-token-mean"), (25, 2, "seq-mean-token-sum-norm"),
])
def test_train_step_packed_equals_padded(mesh, budget, mini_batches, agg):
    """The whole update, packed and padded, from the same weights: the same metrics and the same new weights
    (reference log-probs, old log-probs when there are several mini-batches, KL, entropy bonus, clipping)."""
    results = []
    for pack_rows in (False, True):
        cfg = cfg_for(pack_rows=pack_rows, budget=budget, mini_batches=mini_batches, agg=agg)
        policy = apply_fsdp(CausalLMPolicy(tiny_lm("qwen2", lora=False)), mesh, param_dtype=torch.float32)
        ref = CausalLMPolicy(tiny_lm("qwen2", lora=False, seed=1)).requires_grad_(False)  # KL > 0 at once
        # plain SGD at lr 1: the weights move by the (clipped) gradient itself; AdamW's first step, g / |g|, would
        # blow float noise in near-zero gradients up to the full learning rate
        opt = torch.optim.SGD(policy.parameters(), lr=1.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        metrics = train_step(Models(policy, ref, opt, sched), grpo_batch(), cfg)
        results.append(({k: float(v) for k, v in metrics.items()},
                        {n: p.full_tensor() for n, p in policy.named_parameters()}))
    (padded, w_padded), (packed, w_packed) = results
    assert padded.keys() == packed.keys()
    for k in padded:
        assert packed[k] == pytest.approx(padded[k], rel=1e-5, abs=1e-6), k
    assert padded["kl"] > 0 and padded["grad_norm"] > 0
    for name, p in w_padded.items():
        assert_close(w_packed[name], p, f"weight {name} after the step")


def test_micro_batches_budget_counts_real_tokens():
    batch = grpo_batch()
    lengths = batch.attention_mask.sum(1).tolist()
    budget = 40
    packed = micro_batches(batch, cfg_for(pack_rows=True, budget=budget), ranks=_one_rank())
    padded = micro_batches(batch, cfg_for(pack_rows=False, budget=budget), ranks=_one_rank())
    assert all(sum(lengths[i] for i in g.tolist()) <= budget for g in packed)
    assert len(packed) == -(-sum(lengths) // budget) < len(padded)


def _one_rank():
    from grpo.train_step import Ranks
    return Ranks()


# ------------------------------------------------------------------------------------------- native engine prefill

@pytest.mark.parametrize("family", ["qwen2", "llama", "qwen3"])
def test_engine_packed_prefill_writes_a_plain_forwards_cache(family):
    """Each row's KV cache after the packed prefill holds what the model's own forward of that prompt alone puts
    in a transformers cache, at the row's left-padded columns; the first sampled token's log-prob is the plain
    forward's. Prompts repeat n times: each distinct prompt is prefilled once and copied to its rows."""
    lm = tiny_lm(family, lora=False).eval()
    prompts = [[5, 6, 7, 8], [9], [10, 11, 12, 13, 14, 15, 16]]
    engine = NativeEngine(lm, pad_id=0, eos_id=1, max_new_tokens=1, temperature=1.0)
    out = engine.generate(prompts, n=2, seed=3)
    st = engine._state
    width = max(map(len, prompts))
    for row in range(len(prompts) * 2):
        prompt = prompts[row // 2]
        cache = DynamicCache(config=lm.config)
        with torch.no_grad():
            logits = lm(input_ids=torch.tensor([prompt]), cache=cache, use_cache=True).logits[0, -1]
        for layer in range(lm.config.num_hidden_layers):
            k, v = cache.layers[layer].keys[0], cache.layers[layer].values[0]  # [KV, len, D]
            assert_close(st["k"][layer, row, :, width - len(prompt):width], k, f"row {row} layer {layer} keys")
            assert_close(st["v"][layer, row, :, width - len(prompt):width], v, f"row {row} layer {layer} values")
        c = out[row // 2][row % 2]
        want = torch.log_softmax(logits.double(), -1)[c.token_ids[0]]
        assert abs(c.logprobs[0] - float(want)) < 1e-5
