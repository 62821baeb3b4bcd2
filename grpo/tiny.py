"""The tiny model of the `local` preset: Qwen2 in a small config, and a word-level tokenizer built in code.

Nothing is downloaded: the tokenizer's vocabulary is listed here and the weights come from a seeded init.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

SPECIAL = ["<pad>", "<eos>", "<unk>"]
WORDS = [str(d) for d in range(10)] + ["repeat", "copy", "add", "+", "=", ":", "then"]
VOCAB = SPECIAL + WORDS


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over VOCAB; ids are fixed by the list's order."""
    vocab = {tok: i for i, tok in enumerate(VOCAB)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


# transformers 5 ignores a folder's declared tokenizer class for these model types and builds its own class
# (Qwen2Tokenizer: byte-level BPE from the vocabulary, which drops every word of a word-level tokenizer), unless
# tokenizer_config.json carries an `auto_map` (then, without trust_remote_code, the declared class is used).
# Only where needed: with trust_remote_code=True an auto_map naming a built-in class fails to load.
FORCED_TOKENIZER_MODEL_TYPES = ("qwen2",)


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, path, *, model_type: str | None = None) -> None:
    """Save so that `AutoTokenizer.from_pretrained(path)` loads it back as this word-level tokenizer, beside a
    model of any family. `model_type` defaults to the one in path/config.json, when there is one."""
    path = Path(path)
    tokenizer.save_pretrained(path)
    if model_type is None and (path / "config.json").is_file():
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    config = path / "tokenizer_config.json"
    data = json.loads(config.read_text())
    data["tokenizer_class"] = "TokenizersBackend"  # transformers 5's class for a plain `tokenizers` tokenizer
    if model_type in FORCED_TOKENIZER_MODEL_TYPES:
        data["auto_map"] = {"AutoTokenizer": [None, "TokenizersBackend"]}
    config.write_text(json.dumps(data, indent=2))


def tiny_config(vocab_size: int = len(VOCAB)) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        pad_token_id=VOCAB.index("<pad>"),
        eos_token_id=VOCAB.index("<eos>"),
        bos_token_id=None,
    )


def build_tiny_model(seed: int = 0) -> Qwen2ForCausalLM:
    """The same weights for the same seed, on every process (CPU init, float32)."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = Qwen2ForCausalLM(tiny_config())
    finally:
        torch.random.set_rng_state(gen_state)
    model.generation_config.pad_token_id = VOCAB.index("<pad>")
    model.generation_config.eos_token_id = VOCAB.index("<eos>")
    return model


def tiny_family_config(model_type: str):
    """A tiny config of each supported family (grpo.families), over the tiny vocabulary, with what sets the
    family apart switched on: Qwen3's q/k norms and a head_dim that is not hidden / heads, Llama 3's rope scaling,
    Mistral's sliding window (narrower than a prompt plus its response, so the window matters)."""
    from transformers import LlamaConfig, MistralConfig, Qwen3Config

    common = dict(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  tie_word_embeddings=False, pad_token_id=VOCAB.index("<pad>"), eos_token_id=VOCAB.index("<eos>"),
                  bos_token_id=None)
    if model_type == "qwen2":
        return Qwen2Config(**common)
    if model_type == "qwen3":
        return Qwen3Config(**common, head_dim=16)
    if model_type == "llama":
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
        return LlamaConfig(**common, rope_parameters=rope)
    if model_type == "mistral":
        return MistralConfig(**common, sliding_window=6)
    raise ValueError(f"no tiny config for model_type={model_type!r}")


def save_tiny_checkpoint(path, model_type: str, seed: int = 0) -> Path:
    """A tiny model of `model_type` saved as a Hugging Face folder (config.json, safetensors, the word-level
    tokenizer): what a user's checkpoint folder looks like, for tests and demos. Nothing is downloaded."""
    path = Path(path)
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(tiny_family_config(model_type))
    finally:
        torch.random.set_rng_state(gen_state)
    model.generation_config.pad_token_id = VOCAB.index("<pad>")
    model.generation_config.eos_token_id = VOCAB.index("<eos>")
    model.save_pretrained(path, safe_serialization=True)
    save_tokenizer(build_tokenizer(), path, model_type=model_type)
    return path
