"""Each supported family (Llama 3.x, Qwen2/2.5, Qwen3, Mistral) as a tiny transformers model saved to a folder:
the one table (grpo.families) against what transformers builds, the memory model's shapes against the real
parameter counts, loading into the policy (log-probs equal transformers'), LoRA targets, and the native engine
(greedy equal to transformers' generate, log-probs equal a plain forward, Mistral's sliding window honoured).

The loop itself (one GRPO step with the weight sync, per family) is tests/e2e/test_families_loop.py.
"""

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from grpo.config import ModelConfig
from grpo.families import FAMILIES, LINEAR, family_of, layout_of, sliding_windows
from grpo.policy import build_lm, build_policy, lora_layers
from grpo.rollout import NativeEngine
from grpo.tiny import VOCAB, save_tiny_checkpoint
from hpc.models import CATALOGUE, shape_from_config

PAD, EOS = VOCAB.index("<pad>"), VOCAB.index("<eos>")
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 3], [4]]  # left padding in one batch; 6 + 10 tokens > Mistral's window 6


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def folder(request, tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp(request.param), request.param, seed=3)


def hf_model(folder):
    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def test_table_matches_what_transformers_builds(folder):
    config = json.loads((folder / "config.json").read_text())
    layout = layout_of(config)
    model = hf_model(folder)
    names = {n for n, _ in model.named_parameters()}
    block = "model.layers.0."
    assert all(f"{block}self_attn.{m}.weight" in names for m in ("q_proj", "k_proj", "v_proj", "o_proj"))
    assert all(f"{block}mlp.{m}.weight" in names for m in ("gate_proj", "up_proj", "down_proj"))
    assert (f"{block}self_attn.q_proj.bias" in names) == layout.qkv_bias
    assert (f"{block}self_attn.o_proj.bias" in names) == layout.o_bias
    assert (f"{block}self_attn.q_norm.weight" in names) == layout.qk_norm
    assert model.model.layers[0].self_attn.q_proj.out_features == model.config.num_attention_heads * layout.head_dim
    assert layout.qkv_bias == (config["model_type"] == "qwen2")  # only Qwen2 has attention biases by default
    assert layout.windows == ((6, 6) if config["model_type"] == "mistral" else (None, None))


def test_memory_model_counts_every_parameter(folder):
    shape = shape_from_config(folder / "config.json")
    assert shape.params == sum(p.numel() for p in hf_model(folder).parameters())


@pytest.mark.parametrize("name", ["Llama-3.1-8B", "Qwen3-8B", "Mistral-7B", "Qwen2.5-7B"])
def test_catalogue_shapes_count_as_transformers(name):
    shape = CATALOGUE[name]
    fields = dict(hidden_size=shape.hidden, num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                  num_key_value_heads=shape.kv_heads, intermediate_size=shape.intermediate, vocab_size=shape.vocab,
                  tie_word_embeddings=shape.tied_embeddings)
    if shape.explicit_head_dim:
        fields["head_dim"] = shape.explicit_head_dim
    config = AutoConfig.for_model(shape.family, **fields)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert shape.params == sum(p.numel() for p in model.parameters())


def test_llama_biases_from_config_are_counted(tmp_path):
    """Llama's `attention_bias` puts a bias on q, k, v and o; `mlp_bias` on gate, up and down."""
    config = AutoConfig.for_model("llama", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, intermediate_size=48, vocab_size=20, attention_bias=True,
                                  mlp_bias=True)
    config.save_pretrained(tmp_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert shape_from_config(tmp_path / "config.json").params == sum(p.numel() for p in model.parameters())


def test_unknown_family_is_one_line_naming_the_known_ones():
    with pytest.raises(ValueError) as info:
        family_of({"model_type": "qwen2_5"}, where="model.path='x'")
    msg = str(info.value)
    assert "\n" not in msg and all(t in msg for t in ("qwen2_5", "llama", "qwen2", "qwen3", "mistral"))


def test_qwen_sliding_window_only_from_max_window_layers_when_enabled():
    base = {"model_type": "qwen2", "num_hidden_layers": 4, "sliding_window": 128, "max_window_layers": 2}
    assert sliding_windows(base) == (None,) * 4
    assert sliding_windows({**base, "use_sliding_window": True}) == (None, None, 128, 128)
    assert sliding_windows({"model_type": "mistral", "num_hidden_layers": 2, "sliding_window": None}) == (None, None)


def test_policy_loads_with_transformers_log_probs_and_lora_targets(folder):
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [PAD, PAD, 4, 11, 12, 3]])
    mask = (ids != PAD).long()
    loss_mask = mask[:, 1:].float()
    policy = build_policy(ModelConfig(path=str(folder)), None, seed=0, trainable=True, device="cpu")
    logp, _ = policy(ids, mask, loss_mask)
    with torch.no_grad():
        logits = hf_model(folder)(input_ids=ids, attention_mask=mask).logits.double()
    want = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0] * loss_mask
    torch.testing.assert_close(logp.double(), want, atol=2e-5, rtol=0)
    lora = build_policy(ModelConfig(path=str(folder), lora_rank=4, lora_alpha=8), None, seed=0, trainable=True,
                        device="cpu")
    adapted = sorted({type(m.base_layer).__name__ + ":" + n.rsplit(".", 1)[-1]
                      for n, m in lora.named_modules() if m in lora_layers(lora)})
    assert adapted == sorted(f"Linear:{t}" for t in LINEAR)
    assert len(lora_layers(lora)) == len(LINEAR) * 2


def engine(folder, temperature, max_new=10):
    return NativeEngine(build_lm(ModelConfig(path=str(folder)), seed=0), pad_id=PAD, eos_id=EOS,
                        max_new_tokens=max_new, temperature=temperature)


def test_native_greedy_equals_transformers_generate(folder):
    eng = engine(folder, 0.0)
    model = hf_model(folder)
    out = eng.generate(PROMPTS, n=1, seed=0)
    for prompt, (c,) in zip(PROMPTS, out):
        ref = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             do_sample=False, max_new_tokens=10, pad_token_id=PAD, eos_token_id=EOS)
        assert c.token_ids == ref[0, len(prompt):].tolist()


def reference_logprobs(model, prompt, response):
    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)[len(prompt) - 1:-1]
    return logp.gather(-1, torch.tensor(response)[:, None]).squeeze(-1)


def test_native_sampled_logprobs_equal_a_plain_forward(folder):
    """Sampled, long responses (EOS ignored): the KV cache, the rotary tables, the q/k norms and, for Mistral, the
    window over more than its width. With the window switched off, Mistral's log-probs must differ."""
    eng = NativeEngine(build_lm(ModelConfig(path=str(folder)), seed=0), pad_id=PAD, eos_id=-1, max_new_tokens=12)
    model = hf_model(folder)
    out = eng.generate(PROMPTS, n=2, seed=5)
    worst = 0.0
    for prompt, group in zip(PROMPTS, out):
        for c in group:
            diff = (torch.tensor(c.logprobs, dtype=torch.float64) - reference_logprobs(model, prompt, c.token_ids))
            worst = max(worst, diff.abs().max().item())
    assert worst < 1e-4, worst
    if model.config.model_type == "mistral":
        eng.decoder.windows = (None,) * len(eng.decoder.windows)
        c = eng.generate(PROMPTS[1:2], n=1, seed=5)[0][0]
        full = (torch.tensor(c.logprobs, dtype=torch.float64) - reference_logprobs(model, PROMPTS[1], c.token_ids))
        assert full.abs().max().item() > 1e-3  # the window test above could fail
