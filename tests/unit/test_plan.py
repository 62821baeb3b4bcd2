"""Tests for hpc/plan.py: ranks and roles of the local preset, config checks and the printed plan."""

import pytest

import hpc.plan
from grpo.config import ConfigError, apply_overrides
from hpc.plan import check_config, format_plan, plan_job
from hpc.presets import get_preset


@pytest.fixture(autouse=True)
def no_slurm(monkeypatch):
    monkeypatch.setattr(hpc.plan, "slurm_available", lambda: False)


def _local(*overrides):
    return apply_overrides(get_preset("local"), list(overrides))


@pytest.mark.parametrize("overrides, trainers, rollouts", [
    ([], [0], [1]),
    (["job.trainer_ranks=2"], [0, 1], [2]),
    (["job.rollout_ranks=3"], [0], [1, 2, 3]),
    (["job.trainer_ranks=2", "job.rollout_ranks=2"], [0, 1], [2, 3]),
])
def test_plan_ranks(overrides, trainers, rollouts):
    plan = plan_job(_local(*overrides))
    assert (plan.trainers, plan.rollouts) == (trainers, rollouts)
    assert plan.world_size == plan.tasks_per_node == len(trainers) + len(rollouts)
    assert (plan.executor, plan.device, plan.nodes) == ("local", "cpu", 1)


def test_auto_executor_without_slurm_is_local_with_a_note():
    plan = plan_job(_local("job.executor=auto"))
    assert plan.executor == "local" and any("no Slurm" in n for n in plan.notes)
    assert plan.to_dict()["trainers"] == [0]


@pytest.mark.parametrize("overrides, key", [
    (["train.steps=0"], "train.steps"),
    (["rollout.n=0"], "rollout.n"),
    (["data.prompts_per_step=-1"], "data.prompts_per_step"),
    (["rollout.max_new_tokens=0"], "rollout.max_new_tokens"),
    (["job.rollout_ranks=0"], "job.rollout_ranks"),
    (["job.trainer_ranks=3"], "job.trainer_ranks"),  # 8 x 8 = 64 responses over 3 ranks
    (["data.prompts_per_step=3", "rollout.n=3", "job.trainer_ranks=2"], "job.trainer_ranks"),
    (["train.mini_batches=65"], "train.mini_batches"),  # 64 rows on one rank
    (["job.trainer_ranks=2", "train.mini_batches=33"], "train.mini_batches"),  # 32 rows per rank
    (["train.lr=-1e-5"], "train.lr"),
    (["train.lr=0"], "train.lr"),
    (["rollout.temperature=0"], "rollout.temperature"),
])
def test_check_config_rejects(overrides, key):
    cfg = _local(*overrides)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        plan_job(cfg)  # check_config, or the split check once the ranks are known


@pytest.mark.parametrize("overrides", [
    [], ["train.mini_batches=64"], ["job.trainer_ranks=2", "train.mini_batches=32"], ["job.trainer_ranks=64"],
    ["train.steps=1", "rollout.n=1", "data.prompts_per_step=1"],
])
def test_check_config_accepts_boundaries(overrides):
    check_config(_local(*overrides))


@pytest.mark.parametrize("overrides, trainer_ranks, rollout_ranks", [
    ([], "ranks 0:", "ranks 1:"),
    (["job.trainer_ranks=2", "job.rollout_ranks=2"], "ranks 0-1:", "ranks 2-3:"),
])
def test_format_plan_mentions_ranks_and_engine(overrides, trainer_ranks, rollout_ranks):
    cfg = _local(*overrides)
    text = format_plan(cfg, plan_job(cfg))
    lines = text.splitlines()
    trainer = next(l for l in lines if l.strip().startswith("trainer"))
    rollout = next(l for l in lines if l.strip().startswith("rollout"))
    assert trainer_ranks in trainer and rollout_ranks in rollout
    assert "native engine" in rollout
    assert "'local'" in lines[0] and "no Slurm" in text
    assert "8 prompts x 8 samples" in text and "300 steps" in text


@pytest.mark.parametrize("kl, shown", [("0.001", True), ("0", False)])
def test_format_plan_reference_model_only_with_kl(kl, shown):
    cfg = _local(f"algo.kl_coef={kl}", "rollout.engine=vllm")
    text = format_plan(cfg, plan_job(cfg))
    assert ("frozen reference" in text) is shown
    assert "vllm engine" in text
