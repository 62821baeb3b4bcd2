"""The tiny model of the `local` preset: Qwen2 in a small config, and a word-level tokenizer built in code.

Nothing is downloaded: the tokenizer's vocabulary is listed here and the weights come from a seeded init.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

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


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, path) -> None:
    """Save so that AutoTokenizer loads it back as this word-level tokenizer (beside a Qwen2 config.json it would
    otherwise pick Qwen2's byte-level class and drop the words)."""
    tokenizer.save_pretrained(path)
    config = Path(path) / "tokenizer_config.json"
    data = json.loads(config.read_text())
    data["tokenizer_class"] = "PreTrainedTokenizerFast"
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
