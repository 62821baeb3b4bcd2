"""The step-time model (hpc.steptime) against the measured 1.5B loop, and the layout choice it drives (hpc.layouts,
hpc.plan): the 70B presets' dry runs, forced and refused layouts, memory settings used only where memory needs them."""

import pytest

import hpc.layouts
import hpc.plan
from grpo import hardware as hw
from grpo.config import ConfigError, apply_overrides
from hpc import steptime
from hpc.models import CATALOGUE
from hpc.plan import apply_settings, fmt_ranks, format_plan, plan_job
from hpc.presets import get_preset


@pytest.fixture(autouse=True)
def no_slurm(monkeypatch):
    monkeypatch.setattr(hpc.plan, "slurm_available", lambda: False)


def preset(name, *overrides):
    return apply_overrides(get_preset(name), list(overrides))


def bench(name, gpu, *extra):
    """The plan of `python -m grpo.bench.loop --preset NAME` (8 prompts x 8 samples, 128 + 512 forced tokens, the
    bench's GSM8K-styled prompt rows), on the card it ran on, with activation checkpointing as it ran."""
    return plan_job(preset(name, f"job.gpu_type={gpu}", "model.arch=Qwen2.5-1.5B", "data.task=dataset",
                           "data.train_path=/bench/prompts-gsm8k.jsonl", "data.prompts_per_step=8", "rollout.n=8",
                           "data.max_prompt_len=128", "rollout.max_new_tokens=512", "rollout.ignore_eos=true",
                           "job.executor=local", "model.activation_checkpointing=true", *extra))


def measured_phases(pred):
    """The loop's own split: its update_s holds the log-prob passes, the update and the optimizer step."""
    return {"generation": pred["generation"], "update": pred["update"] + pred["optimizer"], "sync": pred["sync"],
            "step": pred["step"]}


# Seconds typed from GPU_NOTES.md, "The whole loop on GPUs through python -m hpc.submit" (grpo.bench.loop, Qwen2.5-1.5B
# shapes, 8 x 8 responses of 128 + 512 tokens, medians after the warm-up step).
MEASURED = [
    # h100x1 on an H200, call 3 (trainer and native engine sharing GPU 0): the "ours, call 3 (after)" column
    ("h100x1", "h200", (), {"generation": 1.52, "update": 1.55, "sync": 0.016, "step": 3.13}),
    # h100x2 on 2 H200, call 5, full fine-tuning row (trainer GPU 0, native engine GPU 1, NCCL sync)
    ("h100x2", "h200", (), {"generation": 1.62, "update": 1.61, "sync": 0.009, "step": 3.34}),
    # h100x2 LoRA r=32 on 2 H200, call 5: the update only (its generation ran unmerged adapters, since changed)
    ("h100x2", "h200", ("model.lora_rank=32",), {"update": 2.14}),
    # h100x2 LoRA r=32 re-measured on 2 H100 80GB HBM3, call 6 (engine merging the adapters)
    ("h100x2", "h100", ("model.lora_rank=32",), {"generation": 1.81, "update": 2.00, "step": 3.88}),
]


@pytest.mark.parametrize("name,gpu,extra,measured", MEASURED, ids=[f"{m[0]}-{m[1]}-{'lora' if m[2] else 'full'}"
                                                                   for m in MEASURED])
def test_model_within_20_percent_of_the_measured_loop(name, gpu, extra, measured):
    plan = bench(name, gpu, *extra)
    predicted = measured_phases(plan.prediction)
    for phase, seconds in measured.items():
        assert predicted[phase] == pytest.approx(seconds, rel=0.20), (phase, predicted[phase], seconds)


def test_the_measured_layouts_are_the_ones_predicted():
    one, two = bench("h100x1", "h200"), bench("h100x2", "h200")
    assert one.layout == "colocated" and one.prediction["swap"] == 0  # both fit the H200 awake, as measured
    assert two.layout == "split" and two.prediction["label"].startswith("split 1 train + 1 generate")


@pytest.mark.parametrize("name", ["h800x32", "h20x32", "h100x8-lora"])
def test_70b_dry_run_prints_the_prediction_and_never_chooses_slower_than_colocated(name):
    cfg = get_preset(name)
    plan = plan_job(cfg)
    text = format_plan(cfg, plan)
    assert "step time" in text and "chosen" in text
    table = text[text.index("step time"):].splitlines()
    assert any("colocated" in line for line in table[2:]), "verl's colocated layout is always shown"
    colocated = [a["step"] for a in plan.alternatives if a["label"].startswith("colocated")]
    assert colocated and all(plan.prediction["step"] <= s for s in colocated)
    # verl's own settings (colocated, every memory saving on) are predicted beside it, never faster
    seed = [a for a in plan.alternatives if "as verl's seeds" in a["label"]]
    assert len(seed) == 1 and plan.prediction["step"] <= seed[0]["step"]
    assert plan.prediction["step"] == pytest.approx(sum(plan.prediction[p] for p in steptime.PHASES))
    # every phase of the chosen layout is printed with its value
    chosen = next(line for line in table if line.strip().startswith("chosen"))
    assert f"{plan.prediction['update']:.2f}" in chosen and f"{plan.prediction['step']:.2f}" in chosen


def test_h800x32_update_matches_the_issues_estimate():
    """Issue 14: the 72B update is about 4.5e18 FLOPs, some 700 s on 16 H800s at 40% MFU; colocated, 32 GPUs take
    half that."""
    plan = plan_job(get_preset("h800x32"))
    assert plan.layout == "colocated" and 300 < plan.prediction["update"] < 420
    split = [a for a in plan.alternatives if a["label"].startswith("split 16 train")]
    assert split and split[0]["update"] > 1.8 * plan.prediction["update"]


def test_decode_is_bound_by_bytes_on_h800_and_by_flops_on_h20():
    shape = CATALOGUE["Qwen2-72B"]
    step = lambda card, batch: steptime.decode_step_s(shape, hw.GPUS[card], engine="vllm", tp=8, batch=batch,
                                                      context=768)
    # weights dominate the bytes: twice the batch is far less than twice the time on an H800
    assert step("h800", 64) < step("h800", 128) < 1.3 * step("h800", 64)
    # the H20 has 4.0 TB/s but 148 TFLOP/s: at batch 256 it is compute-bound and slower than an H800
    assert step("h20", 256) > 3 * step("h800", 256)


def test_kv_capacity_sets_the_number_of_waves():
    shape, card = CATALOGUE["Qwen2.5-7B"], hw.GPUS["h100"]
    gen = lambda responses: steptime.generation_s(shape, card, engine="vllm", tp=1, engines=1, responses=responses,
                                                  prompt_len=256, new_tokens=256, kv_seqs=64)
    assert gen(128) == pytest.approx(2 * gen(64))  # two full waves
    assert gen(64) < 1.2 * gen(32)  # one wave, bound by the weights either way


def test_old_logprob_pass_only_when_the_sampler_is_not_the_updated_policy():
    base = bench("h100x1", "h200").prediction["update"]
    two = bench("h100x1", "h200", "train.mini_batches=2").prediction["update"]
    off = bench("h100x2", "h200", "train.off_policy_steps=1").prediction["update"]
    # one more forward on top of reference + forward + recompute + backward (5 forwards)
    assert two == pytest.approx(base * 6 / 5, rel=0.05) and off == pytest.approx(two, rel=0.05)


def test_off_policy_overlaps_generation_with_the_update():
    on = bench("h100x2", "h200").prediction
    off = bench("h100x2", "h200", "train.off_policy_steps=1").prediction
    assert off["label"].startswith("split off-policy")
    assert off["step"] == pytest.approx(max(off["generation"], off["update"] + off["optimizer"]) + off["reward"]
                                        + off["sync"])
    assert off["step"] < on["step"]


def test_savings_only_where_memory_needs_them():
    small = plan_job(preset("h100x1", "job.gpu_type=h200"))
    assert small.settings == {"model.activation_checkpointing": False, "model.optimizer_offload": False,
                              "model.param_offload": False, "rollout.gpu_memory_utilization": pytest.approx(
                                  small.settings["rollout.gpu_memory_utilization"])}
    big = plan_job(preset("h800x32"))
    assert big.settings["model.activation_checkpointing"]  # 72B activations do not fit 80 GB otherwise
    forced = plan_job(preset("h100x1", "job.gpu_type=h200", "model.optimizer_offload=true"))
    assert forced.settings["model.optimizer_offload"] and forced.prediction["optimizer"] > small.prediction["optimizer"]
    cfg = apply_settings(get_preset("h800x32"), big.to_dict())
    assert cfg.model.activation_checkpointing is True and cfg.model.param_offload is False
    assert cfg.rollout.gpu_memory_utilization == big.settings["rollout.gpu_memory_utilization"] < 0.85


def test_optimizer_swap_only_where_the_larger_kv_cache_pays_for_it(monkeypatch):
    """72B colocated on 32 H800: at 512 new tokens the engine fits beside the trainer's resident state (no swap); at
    2048 its KV cache does not, and moving each GPU's 18 GB of AdamW state to the host for generation costs two PCIe
    copies a step, less than the alternative, optimizer offload (AdamW on the host every step). The plan carries
    the choice to the ranks (hpc.launch -> Roles)."""
    short = plan_job(preset("h800x32"))
    assert short.layout == "colocated" and short.time_share and not short.swap_optimizer
    long = plan_job(preset("h800x32", "rollout.max_new_tokens=2048"))
    assert long.layout == "colocated" and long.time_share and long.swap_optimizer
    adam_gb = 8 * CATALOGUE["Qwen2-72B"].params / 32 / 1e9
    card = hw.gpu("h800")
    expected = hw.ENGINE_WAKE_S["vllm"] + steptime.optimizer_swap_s(adam_gb, card)
    assert long.prediction["swap"] == pytest.approx(expected, rel=0.02)
    assert not long.settings["model.optimizer_offload"]
    # without the swap (no host room for it), the planner falls back to optimizer offload, slower
    monkeypatch.setattr(hpc.layouts.Search, "host_ok", lambda self, est, gpus, extra=0.0: not extra)
    kept = plan_job(preset("h800x32", "rollout.max_new_tokens=2048"))
    assert not kept.swap_optimizer and kept.settings["model.optimizer_offload"]
    assert kept.prediction["optimizer"] > long.prediction["optimizer"] + 3 > kept.prediction["swap"]
    assert long.prediction["step"] < kept.prediction["step"]
    text = format_plan(preset("h800x32", "rollout.max_new_tokens=2048"), long)
    assert "its AdamW state swapped to the host" in text


def test_forced_layouts_and_refusals():
    split = plan_job(preset("h800x32", "job.layout=split"))
    assert split.layout == "split" and split.tasks_per_node == 8
    colocated = plan_job(preset("h100x2", "job.layout=colocated"))
    assert colocated.layout == "colocated" and colocated.trainers == [0, 1] and colocated.rollouts == [2, 3]
    assert any("job.trainer_ranks=1 ignored" in n for n in colocated.notes)
    with pytest.raises(ConfigError, match="train.off_policy_steps=0"):
        plan_job(preset("h800x32", "job.layout=colocated", "train.off_policy_steps=1"))
    with pytest.raises(ConfigError, match="at least 2 GPUs"):
        plan_job(preset("h100x1", "job.layout=split"))


def test_a_faster_layout_the_config_rules_out_is_named():
    plan = plan_job(preset("h100x2"))  # job.trainer_ranks=1 pins the split
    assert plan.layout == "split"
    assert any(n.startswith("predicted faster") for n in plan.notes)


def test_rank_runs_are_printed_as_ranges():
    assert fmt_ranks([0, 1, 2, 3, 8, 9, 10, 11]) == "0-3,8-11"
    assert fmt_ranks([5]) == "5" and fmt_ranks([0, 2]) == "0,2"
