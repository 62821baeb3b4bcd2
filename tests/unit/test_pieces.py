"""Tests for the small pieces of the loop: tiny tokenizer, toy tasks, batch layout, weight-sync buckets, run log and
the native rollout engine."""

import json
import random

import pytest
import torch

from grpo import runlog
from grpo.batch import make_batch
from grpo.rollout import Completion, NativeEngine
from grpo.tasks import CopyTask, RepeatTask, positional_credit
from grpo.tiny import VOCAB, build_tiny_model, build_tokenizer
from grpo.weight_sync import ALIGN, TensorSpec, bucket_size, dtype_of, plan_buckets, spec_of


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def model():
    return build_tiny_model(seed=0)


# ---------------------------------------------------------------- tokenizer and tasks

@pytest.mark.parametrize("text", ["repeat 7 :", "copy 3 1 4 :", "0 1 2 3 4 5 6 7 8 9 then add + ="])
def test_tokenizer_round_trip(tok, model, text):
    ids = tok(text).input_ids
    assert len(ids) == len(text.split())  # one word, one id; no BOS or EOS added
    assert tok.unk_token_id not in ids
    assert all(0 <= i < model.config.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_vocab_matches_model_and_every_id_decodes_to_itself(tok, model):
    assert len(tok) == len(VOCAB) == model.config.vocab_size
    assert (tok.pad_token_id, tok.eos_token_id) == (model.config.pad_token_id, model.config.eos_token_id)
    for i, word in enumerate(VOCAB):
        assert tok.decode([i], skip_special_tokens=False) == word


@pytest.mark.parametrize("answer, response, want", [
    ("7 7 7 7", "7 7 7 7", 1.0),
    ("7 7 7 7", "7 7 7 7 7 7 7 7", 0.5),  # extra words cost as much as missing ones
    ("7 7 7 7", "7 7 7 7 then", 0.8),
    ("7 7 7 7", "7 7", 0.5),
    ("7 7 7 7", "", 0.0),
    ("7 7 7 7", "7 <pad> 7 7", 0.75),  # a pad word is a wrong word
    ("7 7 7 7", "<pad> <pad> <pad> <pad> 7 7 7 7", 0.0),
    ("3 1 4", "1 4", 0.0),  # position matters
    ("3 1 4", "3 9 4", 2 / 3),
])
def test_positional_credit(answer, response, want):
    assert positional_credit(answer, response) == pytest.approx(want)


@pytest.mark.parametrize("task", [RepeatTask(), CopyTask()])
def test_task_prompts_and_answers_are_spellable(tok, task):
    rng = random.Random(0)
    for _ in range(50):
        p = task.sample(rng)
        assert tok.unk_token_id not in tok(p.text).input_ids + tok(p.answer).input_ids
        assert p.text.startswith(task.name + " ") and p.text.endswith(" :")
        assert task.reward(p, p.answer) == 1.0
        assert task.reward(p, p.answer + " " + p.answer.split()[0]) < 1.0


def test_repeat_task_format():
    p = RepeatTask(times=4).sample(random.Random(1))
    d = p.text.split()[1]
    assert p.text == f"repeat {d} :" and p.answer == " ".join([d] * 4)


@pytest.mark.parametrize("task", [RepeatTask(), CopyTask()])
def test_random_policy_earns_a_little(tok, task):
    """Uniform tokens up to 8 new tokens, cut after EOS, decoded as the trainer decodes them."""
    rng = random.Random(0)
    total = 0.0
    for _ in range(2000):
        p = task.sample(rng)
        ids = []
        while len(ids) < 8:
            ids.append(rng.randrange(len(tok)))
            if ids[-1] == tok.eos_token_id:
                ids.pop()
                break
        total += task.reward(p, tok.decode(ids, skip_special_tokens=False))
    assert 0 < total / 2000 < 0.2


# ---------------------------------------------------------------- batch layout

def test_make_batch_layout():
    prompts = [[13, 10, 18], [14, 5]]
    groups = [[Completion([4, 1], [-0.1, -0.2], "stop"), Completion([4, 4, 4, 5], [-1.0, -2.0, -3.0, -4.0], "length")],
              [Completion([7], [-0.5], "length"), Completion([8, 9, 1], [-0.3, -0.6, -0.9], "stop")]]
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5], dtype=torch.float64)
    b = make_batch(prompts, groups, adv, pad_id=0)
    rows = [(p, c) for p, g in zip(prompts, groups) for c in g]
    width = 7  # 3 + 4
    assert b.input_ids.shape == (4, width) and b.input_ids.dtype == torch.long
    assert b.loss_mask.shape == b.rollout_logp.shape == (4, width - 1)
    assert len(b) == 4
    for i, (p, c) in enumerate(rows):
        seq = p + c.token_ids
        assert b.input_ids[i].tolist() == seq + [0] * (width - len(seq))
        assert b.attention_mask[i].tolist() == [1] * len(seq) + [0] * (width - len(seq))
        on = [k for k, m in enumerate(b.loss_mask[i].tolist()) if m]
        assert on == list(range(len(p) - 1, len(seq) - 1))
        # the target at position k is input_ids[k + 1]: exactly the response tokens
        assert b.input_ids[i, 1:][b.loss_mask[i].bool()].tolist() == c.token_ids
        assert b.rollout_logp[i, on].tolist() == pytest.approx(c.logprobs)
        assert b.rollout_logp[i][~b.loss_mask[i].bool()].abs().sum() == 0
    assert b.advantages.dtype == torch.float32 and b.advantages.tolist() == adv.tolist()
    part = b.rows(1, 3)
    assert len(part) == 2 and torch.equal(part.input_ids, b.input_ids[1:3])
    assert torch.equal(part.advantages, b.advantages[1:3])


# ---------------------------------------------------------------- weight-sync buckets

_SPECS = [TensorSpec("a", (3,), "float32"), TensorSpec("b", (5,), "bfloat16"), TensorSpec("c", (10, 10), "float32"),
          TensorSpec("d", (1000,), "float32"), TensorSpec("e", (7,), "int64"), TensorSpec("f", (33,), "float16"),
          TensorSpec("g", (2, 3, 4), "float32"), TensorSpec("h", (0,), "float32"), TensorSpec("i", (300,), "uint8")]


def _nbytes(s):
    return torch.Size(s.shape).numel() * dtype_of(s.dtype).itemsize


@pytest.mark.parametrize("limit", [1, 64, 100, 256, 1024, 4000, 10**6])
def test_plan_buckets(limit):
    buckets = plan_buckets(_SPECS, limit)
    flat = [s for b in buckets for s in b]
    assert [s.name for s in flat] == [s.name for s in _SPECS]  # every tensor once, in order
    assert [(s.shape, s.dtype) for s in flat] == [(s.shape, s.dtype) for s in _SPECS]
    for b in buckets:
        assert b[0].offset == 0
        for s in b:
            assert s.offset % ALIGN == 0 and s.nbytes == _nbytes(s)
        for prev, s in zip(b, b[1:]):
            assert s.offset >= prev.offset + prev.nbytes  # no overlap
        assert bucket_size(b) <= limit or len(b) == 1
    for b, nxt in zip(buckets, buckets[1:]):  # greedy: the next tensor did not fit
        end = -(-bucket_size(b) // ALIGN) * ALIGN
        assert end + nxt[0].nbytes > limit
    if limit >= 10**6:
        assert len(buckets) == 1


def test_spec_of():
    t = torch.zeros(3, 4, dtype=torch.bfloat16)
    assert spec_of("w", t) == TensorSpec("w", (3, 4), "bfloat16")
    assert spec_of("w", t, torch.float32).dtype == "float32"


# ---------------------------------------------------------------- run log

def test_read_metrics_ignores_partial_line(tmp_path):
    assert runlog.read_metrics(tmp_path) == []
    rows = [{"step": s, "reward": s / 10, "response_len": 8 - s % 3} for s in range(1, 4)]
    for r in rows:
        runlog.append_metrics(tmp_path, r)
    with open(tmp_path / runlog.METRICS, "a") as f:
        f.write(json.dumps({"step": 4, "reward": 0.4})[:12])
    assert runlog.read_metrics(tmp_path) == rows


@pytest.mark.parametrize("n, first, last", [(25, 4.5, 19.5), (10, 4.5, 4.5), (3, 1.0, 1.0)])
def test_reward_summary(n, first, last):
    assert runlog.reward_summary([{"reward": float(r)} for r in range(n)]) == (first, last)


def test_reward_summary_empty():
    with pytest.raises(ValueError):
        runlog.reward_summary([])


def test_plot_rewards(tmp_path):
    for s in range(1, 6):
        runlog.append_metrics(tmp_path, {"step": s, "reward": s / 5, "response_len": 9 - s})
    out = runlog.plot_rewards(tmp_path)
    assert out == tmp_path / runlog.PLOT
    data = out.read_bytes()
    assert len(data) > 1000 and data.startswith(b"\x89PNG")


# ---------------------------------------------------------------- native engine

TEMP, MAX_NEW = 0.7, 6


@pytest.fixture(scope="module")
def engine(tok, model):
    return NativeEngine(model, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, max_new_tokens=MAX_NEW,
                        temperature=TEMP)


@pytest.fixture(scope="module")
def prompts(tok):
    return [tok("repeat 7 :").input_ids, tok("copy 3 1 4 :").input_ids]  # different lengths: left padding


def test_generate_shapes_and_determinism(engine, prompts):
    out = engine.generate(prompts, 3, seed=123)
    assert len(out) == 2 and all(len(g) == 3 for g in out)
    for g in out:
        for c in g:
            assert 1 <= len(c.token_ids) == len(c.logprobs) <= MAX_NEW
            assert (c.finish_reason == "stop") == (c.token_ids[-1] == engine.eos_id)
            assert engine.eos_id not in c.token_ids[:-1]
            assert c.finish_reason in ("stop", "length")
            assert all(lp <= 0 for lp in c.logprobs)
    assert engine.generate(prompts, 3, seed=123) == out
    assert engine.generate(prompts, 3, seed=124) != out
    assert engine.generate([], 3, seed=1) == []


def test_generate_finish_reasons(engine, prompts):
    flat = [c for g in engine.generate(prompts, 16, seed=7) for c in g]
    assert {c.finish_reason for c in flat} == {"stop", "length"}
    for c in flat:
        assert (c.finish_reason == "stop") == (c.token_ids[-1] == engine.eos_id)
        assert c.finish_reason == "stop" or len(c.token_ids) == MAX_NEW


@torch.no_grad()
def test_logprobs_match_a_plain_forward_pass(engine, model, prompts):
    out = engine.generate(prompts, 3, seed=5)
    for p, group in zip(prompts, out):
        for c in group:
            logits = model(torch.tensor([p + c.token_ids])).logits[0].float()
            logp = torch.log_softmax(logits / TEMP, dim=-1)
            pos = torch.arange(len(p) - 1, len(p) - 1 + len(c.token_ids))
            want = logp[pos, torch.tensor(c.token_ids)]
            assert torch.allclose(torch.tensor(c.logprobs), want, atol=1e-4, rtol=0)


@torch.no_grad()
def test_load_weights(tok):
    eng = NativeEngine(build_tiny_model(seed=0), pad_id=tok.pad_token_id, eos_id=tok.eos_token_id,
                       max_new_tokens=2)
    src = dict(build_tiny_model(seed=1).named_parameters())
    assert eng.load_weights(src.items()) == len(src)
    params = dict(eng.model.named_parameters())
    assert all(torch.equal(params[k], v) for k, v in src.items())
    name = "model.norm.weight"
    src[name].add_(1.0)  # a copy, not an alias
    assert not torch.equal(params[name], src[name])
    with pytest.raises(KeyError, match="nope.weight"):
        eng.load_weights([("nope.weight", torch.zeros(1))])
