"""The native engine's compiled decode step: the same tokens and log-probs as eager, one compiled graph for all
blocks (no recompilation per block, which would hit torch.compile's recompile limit on deep models)."""

import torch
import torch._dynamo.utils as dynamo_utils
from transformers import Qwen2Config, Qwen2ForCausalLM

from grpo.rollout import NativeEngine


def test_compiled_decode_matches_eager_with_one_graph():
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512))
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
    eager = NativeEngine(model, pad_id=0, eos_id=-1, max_new_tokens=12, compile=False).generate(prompts, 3, seed=1)
    torch._dynamo.reset()
    dynamo_utils.counters.clear()
    compiled = NativeEngine(model, pad_id=0, eos_id=-1, max_new_tokens=12, compile=True).generate(prompts, 3, seed=1)
    assert dynamo_utils.counters["stats"]["unique_graphs"] == 1
    flat = lambda groups: [c for g in groups for c in g]  # noqa: E731
    assert [c.token_ids for c in flat(eager)] == [c.token_ids for c in flat(compiled)]
    for a, b in zip(flat(eager), flat(compiled)):
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5)
