"""derive(): every per-rank batch number from the few global quantities, and the combinations it refuses."""

import pytest

from grpo.config import ConfigError, apply_overrides, derive
from hpc.presets import get_preset


def test_h800x32_seed_numbers():
    d = derive(get_preset("h800x32"), 16)
    # the seed: 1024 prompts x 5 samples, ppo_mini_batch_size=256 prompts -> 4 optimizer steps per rollout batch
    assert d.responses_per_step == 5120 and d.mini_batch_prompts == 256 and d.optimizer_steps == 4
    assert d.responses_per_rank == 320 and d.mini_batch_rows == 80 and d.max_tokens_per_micro_batch == 24000


def test_h100x8_lora_seed_numbers():
    d = derive(get_preset("h100x8-lora"), 4)
    assert d.responses_per_step == 880 and d.mini_batch_prompts == 176 and d.mini_batch_rows == 220


@pytest.mark.parametrize("overrides,ranks,words", [
    ([], 3, ["64 responses", "3 trainer ranks"]),
    (["train.mini_batches=3"], 1, ["train.mini_batches=3", "data.prompts_per_step=8"]),
    (["train.mini_batches=16"], 1, ["train.mini_batches=16"]),  # 16 does not divide 8 prompts
])
def test_impossible_splits_are_refused(overrides, ranks, words):
    with pytest.raises(ConfigError) as e:
        derive(apply_overrides(get_preset("local"), overrides), ranks)
    assert all(w in str(e.value) for w in words), str(e.value)
