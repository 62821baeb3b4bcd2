"""The native engine against independent references: a plain full-sequence forward of the same model (float64
log-softmax), transformers' own greedy `generate`, and the softmax distribution for the sampler."""

import pytest
import torch

from grpo.rollout import NativeEngine
from grpo.tiny import build_tiny_model

EOS, PAD = 1, 0
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 3], [4]]  # different lengths: left padding in one batch


def engine(temperature=1.0, max_new=12, seed=0):
    return NativeEngine(build_tiny_model(seed), pad_id=PAD, eos_id=EOS, max_new_tokens=max_new,
                        temperature=temperature)


def reference_logprobs(model, prompt, response, temperature):
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(ids).logits[0].double()
    logp = torch.log_softmax(logits / temperature, dim=-1)[len(prompt) - 1:-1]
    return logp.gather(-1, torch.tensor(response)[:, None]).squeeze(-1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_equal_a_plain_forward(temperature):
    eng = engine(temperature)
    out = eng.generate(PROMPTS, n=3, seed=11)
    assert [len(g) for g in out] == [3, 3, 3]
    worst, count = 0.0, 0
    for prompt, group in zip(PROMPTS, out):
        for c in group:
            ref = reference_logprobs(eng.model, prompt, c.token_ids, temperature)
            got = torch.tensor(c.logprobs, dtype=torch.float64)
            worst = max(worst, (got - ref).abs().max().item())
            count += len(c.token_ids)
    assert count > 20
    assert worst < 1e-5, f"engine log-probs differ from a full forward by up to {worst:.2e}"


def test_same_seed_same_output_and_other_seed_differs():
    eng = engine()
    a = eng.generate(PROMPTS, n=4, seed=3)
    b = eng.generate(PROMPTS, n=4, seed=3)
    c = eng.generate(PROMPTS, n=4, seed=4)
    ids = lambda out: [[x.token_ids for x in g] for g in out]  # noqa: E731
    assert ids(a) == ids(b)
    assert [[x.logprobs for x in g] for g in a] == [[x.logprobs for x in g] for g in b]
    assert ids(a) != ids(c)
    assert len({tuple(x.token_ids) for x in a[1]}) > 1, "the samples of one group should differ"


def test_eos_stops_each_row_on_its_own():
    eng = engine(max_new=10)
    out = [c for g in eng.generate(PROMPTS, n=8, seed=5) for c in g]
    reasons = {c.finish_reason for c in out}
    assert reasons == {"stop", "length"}, reasons
    for c in out:
        assert len(c.token_ids) == len(c.logprobs)
        if c.finish_reason == "stop":
            assert c.token_ids[-1] == EOS and EOS not in c.token_ids[:-1] and len(c.token_ids) <= 10
        else:
            assert EOS not in c.token_ids and len(c.token_ids) == 10
    assert len({len(c.token_ids) for c in out}) > 2


def test_greedy_equals_transformers_generate():
    eng = engine(temperature=0.0, max_new=10)
    out = eng.generate(PROMPTS, n=1, seed=0)
    for prompt, (c,) in zip(PROMPTS, out):
        ref = eng.model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                 do_sample=False, max_new_tokens=10, pad_token_id=PAD, eos_token_id=EOS)
        assert c.token_ids == ref[0, len(prompt):].tolist()


def test_sampler_follows_the_tempered_softmax():
    temperature = 0.8
    eng = engine(temperature, max_new=1)
    n = 4000
    (group,) = eng.generate([[5, 6, 7]], n=n, seed=1)
    counts = torch.bincount(torch.tensor([c.token_ids[0] for c in group]), minlength=20).double()
    with torch.no_grad():
        logits = eng.model(torch.tensor([[5, 6, 7]])).logits[0, -1].double()
    probs = torch.softmax(logits / temperature, dim=-1)
    expected = probs * n
    chi2 = (((counts - expected) ** 2) / expected.clamp(min=1e-9)).sum().item()
    assert chi2 < 45, f"chi-square {chi2:.1f} over 19 degrees of freedom: the sampler is off"  # p < 1e-3


def test_cache_reuse_across_calls_and_weight_load():
    eng = engine()
    short = eng.generate([[4, 5]], n=2, seed=9)
    eng.generate([[3] * 40, [5]], n=3, seed=1)  # a longer cache and another batch size in between
    again = eng.generate([[4, 5]], n=2, seed=9)
    assert [c.token_ids for c in short[0]] == [c.token_ids for c in again[0]]
    other = build_tiny_model(seed=7)
    assert eng.load_weights(other.named_parameters()) == len(list(other.parameters()))
    moved = eng.generate([[4, 5]], n=2, seed=9)
    assert [c.token_ids for c in moved[0]] != [c.token_ids for c in short[0]]
    ref = reference_logprobs(other, [4, 5], moved[0][0].token_ids, 1.0)
    assert torch.allclose(torch.tensor(moved[0][0].logprobs, dtype=torch.float64), ref, atol=1e-5)
    with pytest.raises(KeyError):
        eng.load_weights([("model.nope.weight", torch.zeros(1))])
    with pytest.raises(ValueError):
        eng.generate([[]], n=1, seed=0)
