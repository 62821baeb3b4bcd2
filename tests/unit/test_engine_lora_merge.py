"""The native engine's LoRA path: adapters arrive as the trainer sends them (peft-file names) and generation runs on
weights merged from a kept base copy. Same logits as peft's unmerged forward, and a second sync replaces the first
merge rather than adding to it."""

import torch

from grpo.config import ModelConfig
from grpo.policy import ADAPTER, PEFT_PREFIX, MergedAdapters, build_lm, is_adapter, load_adapter_weights


def adapters(seed: int, like) -> list[tuple[str, torch.Tensor]]:
    """Random non-zero adapters under the names the weight sync uses (B starts at zero in peft: a merge of zero
    would pass any test)."""
    gen = torch.Generator().manual_seed(seed)
    return [(PEFT_PREFIX + n.replace(f".{ADAPTER}.weight", ".weight"), torch.randn(p.shape, generator=gen) * 0.2)
            for n, p in like.named_parameters() if is_adapter(n)]


def test_merged_adapters_match_peft_forward_across_syncs():
    cfg = ModelConfig(path="tiny", lora_rank=4, lora_alpha=8)
    plain, merged_lm = build_lm(cfg, seed=0), build_lm(cfg, seed=0)
    base = {n: p.detach().clone() for n, p in merged_lm.named_parameters() if n.endswith("base_layer.weight")}
    merged = MergedAdapters(merged_lm)
    ids = torch.randint(0, 20, (3, 9), generator=torch.Generator().manual_seed(5))
    for seed in (1, 2):
        sent = adapters(seed, plain)
        assert load_adapter_weights(plain, sent) == merged.load(sent) == len(sent) > 0
        with torch.no_grad():
            want, got = plain(ids).logits, merged_lm(ids).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert merged.layers and all(m.merged for m in merged.layers)
    # the second merge started from the base, not from the first merge
    params = dict(merged_lm.named_parameters())
    for name, w0 in base.items():
        module = name.removesuffix(".base_layer.weight")
        a, b = params[f"{module}.lora_A.{ADAPTER}.weight"], params[f"{module}.lora_B.{ADAPTER}.weight"]
        torch.testing.assert_close(params[name], w0 + 2.0 * b @ a, rtol=1e-6, atol=1e-6)
