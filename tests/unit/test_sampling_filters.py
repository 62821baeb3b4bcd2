"""top-k / top-p in the native engine, and the per-call temperature validation uses (0: greedy)."""

import pytest
import torch

from grpo.rollout import NativeEngine
from grpo.tiny import build_tiny_model

EOS, PAD = 1, 0
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 3], [4]]


def engine(**kw):
    return NativeEngine(build_tiny_model(0), pad_id=PAD, eos_id=EOS, max_new_tokens=10, **kw)


def tempered_logits(model, prompt, response, temperature):
    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0].double() / temperature
    return logits[len(prompt) - 1:-1]


def test_temperature_zero_per_call_is_greedy_whatever_the_engine_temperature():
    eng = engine(temperature=1.0)
    greedy = engine(temperature=0.0).generate(PROMPTS, n=1, seed=0)
    for seed in (1, 2):
        got = eng.generate(PROMPTS, n=2, seed=seed, temperature=0.0)
        assert [[c.token_ids for c in g] for g in got] == [[g[0].token_ids] * 2 for g in greedy]
    sampled = eng.generate(PROMPTS, n=4, seed=3)  # the engine's own temperature again: samples differ
    assert len({tuple(c.token_ids) for g in sampled for c in g}) > 3


def test_top_k_one_is_greedy_with_log_prob_zero():
    eng = engine(temperature=1.0, top_k=1)
    greedy = engine(temperature=0.0).generate(PROMPTS, n=1, seed=0)
    got = eng.generate(PROMPTS, n=3, seed=5)
    assert [[c.token_ids for c in g] for g in got] == [[g[0].token_ids] * 3 for g in greedy]
    assert all(lp == 0.0 for g in got for c in g for lp in c.logprobs)


@pytest.mark.parametrize("top_k,top_p", [(3, 1.0), (0, 0.5), (5, 0.8)])
def test_samples_stay_inside_the_filter_and_log_probs_are_of_the_filtered_distribution(top_k, top_p):
    temperature = 0.9
    eng = engine(temperature=temperature, top_k=top_k, top_p=top_p)
    out = eng.generate(PROMPTS, n=6, seed=7)
    checked = 0
    for prompt, group in zip(PROMPTS, out):
        for c in group:
            logits = tempered_logits(eng.model, prompt, c.token_ids, temperature)
            for t, (tok, lp) in enumerate(zip(c.token_ids, c.logprobs)):
                row = logits[t]
                keep = torch.ones_like(row, dtype=torch.bool)
                if top_k:
                    keep &= row >= torch.topk(row, top_k).values[-1]
                probs = torch.softmax(row.masked_fill(~keep, float("-inf")), -1)
                sorted_p, order = probs.sort(descending=True)
                before = sorted_p.cumsum(0) - sorted_p
                nucleus = torch.zeros_like(keep).scatter(0, order, before < top_p)
                keep &= nucleus
                assert keep[tok], (t, tok)
                ref = torch.log_softmax(row.masked_fill(~keep, float("-inf")), -1)[tok].item()
                assert lp == pytest.approx(ref, abs=1e-4)
                checked += 1
    assert checked > 30


def test_bad_filters_are_refused():
    with pytest.raises(ValueError, match="top_p"):
        engine(top_p=0.0)
    with pytest.raises(ValueError, match="top_k"):
        engine(top_k=-1)


def test_vllm_sampling_args_take_the_filters_and_a_per_call_temperature():
    from grpo.vllm_engine import VLLMSettings, sampling_args

    s = VLLMSettings(model_path="m", max_new_tokens=8, max_model_len=32, temperature=0.8, top_p=0.9, top_k=20)
    train = sampling_args(s, n=5, seed=1, index=0)
    val = sampling_args(s, n=1, seed=1, index=0, temperature=0.0)
    assert (train["temperature"], train["top_p"], train["top_k"]) == (0.8, 0.9, 20)
    assert val["temperature"] == 0.0 and val["n"] == 1


def test_login_check_refuses_bad_filters():
    from grpo.config import ConfigError, apply_overrides
    from hpc.checks import check_sampling
    from hpc.presets import get_preset

    for bad in (["rollout.top_p=0"], ["rollout.top_p=1.5"], ["rollout.top_k=-1"]):
        with pytest.raises(ConfigError, match="top_p must be in"):
            check_sampling(apply_overrides(get_preset("local"), bad))
    assert check_sampling(apply_overrides(get_preset("local"), ["rollout.top_p=0.9", "rollout.top_k=50"])) == []
