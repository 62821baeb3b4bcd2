"""The metric-name mapping (verl's names), and the trackers: TensorBoard always, W&B offline when installed."""

import pytest

from grpo.config import apply_overrides
from grpo.tracking import Tracker, val_names, verl_names
from hpc.presets import get_preset

ROW = {"step": 3, "reward": 0.5, "reward_max": 1.0, "reward_min": 0.0, "pg_loss": -0.1, "entropy": 2.0, "kl": 0.01,
       "grad_norm": 0.7, "clipfrac": 0.02, "response_len": 6.0, "response_clip_frac": 0.25, "generate_s": 0.5,
       "update_s": 1.5, "step_s": 2.0, "num_tokens": 800.0, "adv_mean": 0.0, "frac_reward_zero_std": 0.5,
       "gen_t0": 1.7e9, "rollout_is_weight_mean": 0.9, "reward_extra/acc": 0.5, "something_new": 4.0}


def test_rows_map_to_verl_names_and_nothing_is_dropped():
    out = verl_names(ROW, num_gpus=4)
    assert out["critic/score/mean"] == out["critic/rewards/mean"] == 0.5
    assert out["actor/pg_loss"] == -0.1 and out["actor/kl_loss"] == 0.01 and out["actor/pg_clipfrac"] == 0.02
    assert out["response_length/clip_ratio"] == 0.25 and out["timing_s/gen"] == 0.5
    assert out["timing_s/update_actor"] == 1.5 and out["timing_s/step"] == 2.0
    assert out["perf/throughput"] == 800 / 2.0 / 4 and out["perf/tokens_per_s"] == 400.0  # verl's is per GPU
    assert out["frac_reward_zero_std"] == 0.5 and out["rollout_corr/rollout_is_weight_mean"] == 0.9
    assert out["reward_extra/acc"] == 0.5 and out["other/something_new"] == 4.0
    assert "other/step" not in out and "other/gen_t0" not in out  # the x axis, and timestamps: not plotted


def test_validation_rows_use_verls_val_core_names():
    out = val_names({"step": 5, "val/n": 4, "val/reward": 0.3, "val/openai/gsm8k/reward": 0.3,
                     "val/openai/gsm8k/reward_best": 0.6, "val/s": 1.0})
    assert out == {"val-core/openai/gsm8k/reward/mean@4": 0.3, "val-aux/openai/gsm8k/reward/best@4/mean": 0.6,
                   "val-aux/reward": 0.3, "val-aux/s": 1.0}


def test_wandb_offline_run_in_the_run_folder(tmp_path, monkeypatch):
    pytest.importorskip("wandb")  # optional: pip install 'hpc-grpo[wandb]'
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = apply_overrides(get_preset("local"), ["track.wandb=true", "track.wandb_project=test"])
    tracker = Tracker(tmp_path, cfg)
    tracker.log(ROW)
    tracker.log_validation({"step": 3, "val/n": 1, "val/reward": 0.2, "val/x/reward": 0.2})
    tracker.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb")), list((tmp_path / "wandb").iterdir())
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))  # TensorBoard as always


def test_a_reward_functions_own_numbers_go_to_val_aux():
    out = val_names({"step": 1, "val/n": 1, "val/openai/gsm8k/reward": 0.5, "val/openai/gsm8k/acc": 0.5,
                     "val/reward_timeouts": 0.0})
    assert out == {"val-core/openai/gsm8k/reward/mean@1": 0.5, "val-aux/openai/gsm8k/acc/mean@1": 0.5,
                   "val-aux/reward_timeouts": 0.0}
