"""Export of an unsharded policy to a Hugging Face folder: sharding into files, and round trips through
transformers and peft (full fine-tuning, LoRA merged, LoRA as an adapter folder).

The FSDP2 round trip (gathered from shards on two ranks) is in tests/distributed/test_policy.py.
"""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from grpo.config import ModelConfig
from grpo.export import export_adapter, export_hf, iter_full_state
from grpo.policy import build_policy


def save_checkpoint(folder, *, tied: bool, seed: int = 0):
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=23, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                         tie_word_embeddings=tied)
    Qwen2ForCausalLM(config).save_pretrained(folder, safe_serialization=True, max_shard_size="20KB")
    return str(folder)


def token_logp(model, ids, mask):
    """Log-prob of each next token from a plain transformers model, in float64."""
    logits = model(input_ids=ids, attention_mask=mask).logits.double()
    return torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]


def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 23, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding on one row
    return ids, mask, torch.ones(3, 6) * mask[:, 1:]


@torch.no_grad()
def perturb(policy, *, only_adapters: bool):
    """Stand-in for training: move every (trainable) parameter."""
    g = torch.Generator().manual_seed(7)
    for name, p in policy.named_parameters():
        if not only_adapters or "lora_" in name:
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def assert_close(got, want, mask, what):
    diff = ((got.double() - want) * mask).abs()
    assert diff.max() < 2e-5, f"{what}: {int((diff > 2e-5).sum())} of {int(mask.sum())} log-probs differ, max {diff.max():.2e}"


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_full_export_round_trip_in_several_shards(tmp_path, tied):
    src = save_checkpoint(tmp_path / "src", tied=tied)
    policy = build_policy(ModelConfig(path=src), None, seed=0, trainable=True, device="cpu")
    perturb(policy, only_adapters=False)
    out = export_hf(policy, tmp_path / "out", max_shard_bytes=30_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) >= 3 and all((out / f).is_file() for f in files)
    assert not list(out.glob("*.part"))
    ids, mask, loss_mask = batch()
    with torch.no_grad():
        want, _ = policy(ids, mask, loss_mask)
        loaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
        assert loaded.config.tie_word_embeddings == tied
        assert_close(want, token_logp(loaded, ids, mask), loss_mask, "exported model vs policy")
    names = {n for n, _ in iter_full_state(policy)}
    assert names == set(index["weight_map"]) and ("lm_head.weight" in names) != tied


def test_export_into_one_file_replaces_an_earlier_sharded_export(tmp_path):
    src = save_checkpoint(tmp_path / "src", tied=False)
    policy = build_policy(ModelConfig(path=src), None, seed=0, trainable=True, device="cpu")
    export_hf(policy, tmp_path / "out", max_shard_bytes=30_000)
    out = export_hf(policy, tmp_path / "out", dtype=torch.bfloat16)
    assert sorted(p.name for p in out.glob("model*")) == ["model.safetensors"]
    loaded = AutoModelForCausalLM.from_pretrained(str(out))
    assert loaded.dtype == torch.bfloat16


def test_lora_merged_export_and_adapter_folder_match_the_policy(tmp_path):
    from peft import PeftModel

    src = save_checkpoint(tmp_path / "src", tied=False)
    cfg = ModelConfig(path=src, lora_rank=4, lora_alpha=8)
    policy = build_policy(cfg, None, seed=0, trainable=True, device="cpu")
    perturb(policy, only_adapters=True)
    ids, mask, loss_mask = batch()
    with torch.no_grad():
        want, _ = policy(ids, mask, loss_mask)
        merged = AutoModelForCausalLM.from_pretrained(str(export_hf(policy, tmp_path / "merged", max_shard_bytes=30_000)),
                                                      dtype=torch.float32)
        assert_close(want, token_logp(merged, ids, mask), loss_mask, "merged export vs policy")
        adapter = export_adapter(policy, tmp_path / "adapter", base_model=src)
        base = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
        peft_model = PeftModel.from_pretrained(base, str(adapter))
        assert_close(want, token_logp(peft_model, ids, mask), loss_mask, "peft adapter folder vs policy")
        # peft's own merge is an independent reference for the merged weights
        reference = peft_model.merge_and_unload().state_dict()
        for name, tensor in iter_full_state(policy):
            assert torch.allclose(tensor, reference[name], atol=1e-6), f"{name}: merged weight differs from peft's"
        unmerged = dict(iter_full_state(policy, merge_lora=False))
        plain = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).state_dict()
        assert all(torch.equal(unmerged[n], plain[n]) for n in unmerged), "merge_lora=False must give the base"


def test_export_adapter_without_lora_is_an_error(tmp_path):
    policy = build_policy(ModelConfig(), None, seed=0, trainable=True, device="cpu")
    with pytest.raises(ValueError, match="no LoRA adapters"):
        export_adapter(policy, tmp_path / "a")
