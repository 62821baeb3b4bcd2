"""Synthetic inputs for benchmarks and GPU tests, written to disk so that the production loaders read them: a Qwen2
checkpoint with random weights, a word-level tokenizer of any vocabulary size, and prompt files of exact lengths.
Nothing is downloaded."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch

# eos_boost: the value put in dimension 0 of every embedding, and what the final norm leaves of it (measured)
_DIM0, _DIM0_SCALE = 8.0, {"qwen2.5-1.5b": 1.94, "tiny": 7.99, "small": 15.4}

SHAPES = {
    # Qwen2.5-1.5B: hidden 1536, 28 layers, 12 heads / 2 KV heads of 128, MLP 8960, vocab 151936, tied head
    "qwen2.5-1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True,
                         rope_theta=1000000.0, rms_norm_eps=1e-6, max_position_embeddings=32768),
    "tiny": dict(vocab_size=1000, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=False, max_position_embeddings=4096),
    # the smallest shapes vLLM's attention kernels take (head dim 64); EOS and pad ids of write_word_tokenizer
    "small": dict(vocab_size=2048, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=False, max_position_embeddings=2048, eos_token_id=1,
                  bos_token_id=1, pad_token_id=0, initializer_range=0.1),
}


def write_random_checkpoint(folder: Path, shapes: str, *, device: torch.device, seed: int = 0,
                            shard_bytes: int = 2 * 10**9, eos_boost: float = 0.0) -> float:
    """A Hugging Face folder with random bf16 weights (std 0.02, norms 1), written tensor by tensor.

    eos_boost > 0 makes responses end at random lengths, as real ones do (EOS is token 1 of write_word_tokenizer):
    every token's embedding gets _DIM0 in dimension 0, a direction the random layers barely touch, so after the final
    norm every position carries about the same large value there; EOS's output row gets `eos_boost` more in that
    dimension (scaled by that value), which raises EOS's logit by about `eos_boost` at every position and leaves the
    other tokens' logits shifted alike (no change to their softmax). A constant chance to stop per token: geometric
    lengths, capped by max_new_tokens."""
    from safetensors.torch import save_file
    from transformers import Qwen2Config, Qwen2ForCausalLM

    t0 = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    config = Qwen2Config(**SHAPES[shapes])
    with torch.device("meta"):
        names = [(n, p.shape) for n, p in Qwen2ForCausalLM(config).named_parameters()]  # a tied head once
    gen = torch.Generator(device=device).manual_seed(seed)
    parts, current, used = [], {}, 0

    def flush():
        nonlocal current, used
        parts.append(current)
        current, used = {}, 0

    for name, shape in names:
        if name.endswith("norm.weight"):
            t = torch.ones(shape, device=device)
        else:
            t = torch.randn(shape, generator=gen, device=device) * 0.02
        if eos_boost and name in ("model.embed_tokens.weight", "lm_head.weight"):
            t[:, 0] = _DIM0
            t[1, 0] += eos_boost / _DIM0_SCALE[shapes]
        t = t.to(torch.bfloat16).cpu()
        if current and used + t.numel() * 2 > shard_bytes:
            flush()
        current[name] = t
        used += t.numel() * 2
    flush()
    weight_map = {}
    for i, part in enumerate(parts, start=1):
        file = f"model-{i:05d}-of-{len(parts):05d}.safetensors"
        save_file(part, str(folder / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    total = sum(t.numel() * 2 for part in parts for t in part.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    config.save_pretrained(str(folder))
    return time.perf_counter() - t0


def write_word_tokenizer(folder: Path, vocab_size: int) -> None:
    """A word-level tokenizer over `vocab_size` ids: <pad> 0, <eos> 1, then words w2, w3, ... (one token each), so a
    prompt of k words is exactly k tokens. No chat template: prompts are encoded as they are."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, vocab_size)}}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>").save_pretrained(str(folder))


def write_model_folder(folder: Path, shapes: str, *, device: torch.device, seed: int = 0,
                       eos_boost: float = 0.0) -> float:
    """A Hugging Face folder (config, random bf16 weights, word-level tokenizer) that grpo, vLLM and transformers
    load. Returns the seconds it took."""
    t = write_random_checkpoint(folder, shapes, device=device, seed=seed, eos_boost=eos_boost)
    write_word_tokenizer(folder, SHAPES[shapes]["vocab_size"])
    return t


def write_prompts(path: Path, *, num: int, length: int, vocab_size: int, seed: int = 0) -> None:
    """A jsonl prompt file in verl's layout: `num` prompts of exactly `length` random words (tokens), GSM8K-styled
    rows with ground truth "0" (the reward is almost always 0: speed is measured, not learning)."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(num):
            text = " ".join(f"w{rng.randrange(2, vocab_size)}" for _ in range(length))
            f.write(json.dumps({"prompt": [{"role": "user", "content": text}], "data_source": "openai/gsm8k",
                                "reward_model": {"style": "rule", "ground_truth": "0"},
                                "extra_info": {"index": i}}) + "\n")
