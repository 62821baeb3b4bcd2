"""GPU planning: the seed presets on their nominal hardware and on a cluster with drained, busy and missing nodes."""

import pytest

from grpo.config import ConfigError, apply_overrides
from hpc import memory
from hpc.cluster import Cluster, Node, Partition, parse_node_state
from hpc.models import CATALOGUE
from hpc.plan import GPU_MEMORY_GB, plan_job
from hpc.presets import get_preset


def preset(name, *overrides):
    return apply_overrides(get_preset(name), list(overrides))


def node(name, state="idle", gpu="h800", count=8, partitions=("h800",), memory_mb=2_000_000):
    return Node(name=name, state=parse_node_state(state), gpus={gpu: count} if gpu else {}, cpus=128,
                memory_mb=memory_mb, partitions=partitions)


def cluster(*nodes, state="up", timelimit_s=None):
    parts = {}
    for n in nodes:
        for p in n.partitions:
            parts.setdefault(p, []).append(n.name)
    return Cluster(partitions=tuple(Partition(name=p, default=i == 0, state=state, timelimit_s=timelimit_s,
                                              nodes=tuple(ns)) for i, (p, ns) in enumerate(parts.items())),
                   nodes=tuple(nodes))


@pytest.mark.parametrize("name", ["h800x32", "h20x32", "h100x8-lora", "h100x2", "h100x1"])
def test_seed_presets_fit_their_nominal_hardware(name):
    cfg = get_preset(name)
    plan = plan_job(cfg)
    per_node, gpus = cfg.job.gpus_per_node, cfg.job.nodes * cfg.job.gpus_per_node
    if plan.layout == "colocated":
        # two tasks per GPU: local ranks 0..N-1 train, N..2N-1 are engines on the same GPUs (local rank % N)
        assert plan.tasks_per_node == 2 * per_node and plan.world_size == 2 * gpus
        for n in range(cfg.job.nodes):
            first = n * 2 * per_node
            local = lambda ranks: [r - first for r in ranks if first <= r < first + 2 * per_node]  # noqa: E731
            assert local(plan.trainers) == list(range(per_node))
            assert local(plan.rollouts) == list(range(per_node, 2 * per_node))
    else:
        assert plan.world_size == gpus
        assert plan.trainers == list(range(len(plan.trainers))) and plan.rollouts[0] == len(plan.trainers)
        assert len(plan.trainers) % plan.tp == 0 and len(plan.rollouts) % plan.tp == 0
    # engines stay inside a node: TP divides the node and no engine straddles a node boundary
    assert per_node % plan.tp == 0
    assert plan.tokens_per_micro_batch >= cfg.data.max_prompt_len + cfg.rollout.max_new_tokens
    assert "total on GPU" in plan.memory_table


def test_h800x32_trains_on_whole_nodes_and_keeps_tp_inside_a_node():
    plan = plan_job(preset("h800x32", "job.layout=split"))
    assert plan.layout == "split"
    assert len(plan.trainers) % 8 == 0 and 8 <= len(plan.trainers) < 32
    assert plan.tp <= 8  # the seed's TP=16 spans two nodes


def test_72b_full_training_on_one_node_is_refused_with_what_would_fit():
    with pytest.raises(ConfigError) as e:
        plan_job(preset("h800x32", "job.nodes=1"))
    msg = str(e.value)
    assert "does not fit" in msg and "h100x8-lora" in msg and "TB" in msg


def test_without_offload_72b_split_needs_more_than_32_gpus():
    """16 trainer GPUs cannot hold 16 bytes per parameter of 72B; colocated, all 32 GPUs train and it fits."""
    no_offload = ("model.param_offload=false", "model.optimizer_offload=false")
    with pytest.raises(ConfigError, match="does not fit"):
        plan_job(preset("h800x32", *no_offload, "job.layout=split"))
    plan = plan_job(preset("h800x32", *no_offload))
    assert plan.layout == "colocated" and len(plan.trainers) == 32
    assert not plan.settings["model.param_offload"] and not plan.settings["model.optimizer_offload"]


def test_micro_batch_budget_shrinks_to_fit():
    big = plan_job(preset("h100x8-lora", "train.max_tokens_per_gpu=200000"))
    assert big.tokens_per_micro_batch < 200000


def test_memory_per_gpu_falls_with_more_trainer_gpus():
    shape = CATALOGUE["Qwen2-72B"]
    kw = dict(tokens_per_micro_batch=8192, lora_rank=0, param_offload=False, optimizer_offload=False,
              activation_checkpointing=True, reference=True, reference_offload=False)
    a, b = (memory.trainer_memory(shape, gpus=g, **kw) for g in (16, 32))
    assert b.gpu_total < a.gpu_total
    # fp32 params + grads + AdamW: 16 bytes per parameter, sharded
    sharded = sum(v for k, v in a.gpu.items() if k.startswith(("parameters", "gradients", "AdamW")))
    assert sharded == pytest.approx(16 * shape.params / 16 / 1e9)


def test_lora_keeps_no_optimizer_state_for_the_base():
    shape = CATALOGUE["Qwen2.5-72B"]
    est = memory.trainer_memory(shape, gpus=4, tokens_per_micro_batch=4096, lora_rank=32, param_offload=False,
                                optimizer_offload=False, activation_checkpointing=True, reference=True,
                                reference_offload=False)
    assert est.gpu["AdamW states (adapters)"] < 1 and "reference (bf16 shards)" not in est.gpu


def test_drained_and_busy_nodes_are_skipped():
    c = cluster(node("g1", "drained"), node("g2", "mixed"), *(node(f"g{i}") for i in range(3, 7)))
    plan = plan_job(preset("h800x32"), c)
    assert plan.partition == "h800" and plan.nodelist == ["g3", "g4", "g5", "g6"]
    assert any("g1: drained" in n for n in plan.notes) and any("g2: busy" in n for n in plan.notes)


@pytest.mark.parametrize("nodes,match", [
    ([node(f"g{i}") for i in range(3)], "the job needs 4"),
    ([node(f"g{i}", gpu="h100", partitions=("h100",)) for i in range(4)], "no node with gpu:h800:8"),
    ([node("g0", "down*"), *(node(f"g{i}") for i in range(1, 4))], "g0: down"),
])
def test_impossible_requests_fail_before_submission(nodes, match):
    with pytest.raises(ConfigError, match=match):
        plan_job(preset("h800x32"), cluster(*nodes))


def test_a_down_partition_and_an_unknown_partition_are_refused():
    with pytest.raises(ConfigError, match="is down"):
        plan_job(preset("h800x32"), cluster(*(node(f"g{i}") for i in range(4)), state="down"))
    with pytest.raises(ConfigError, match="no partition 'gpu'"):
        plan_job(preset("h800x32", "job.partition=gpu"), cluster(*(node(f"g{i}") for i in range(4))))


def test_host_memory_of_the_nodes_is_checked():
    small = cluster(*(node(f"g{i}", memory_mb=256 * 1024) for i in range(4)))
    with pytest.raises(ConfigError, match="offloaded per node"):
        plan_job(preset("h800x32", "model.param_offload=true"), small)


def test_known_cards():
    assert GPU_MEMORY_GB["h800"] == 80 and GPU_MEMORY_GB["h20"] == 96


def test_plan_prints_the_expected_sync_time():
    full = plan_job(get_preset("h800x32"))
    lora = plan_job(get_preset("h100x8-lora"))
    native_lora = plan_job(preset("h100x2", "model.lora_rank=64"))
    # 72.7 B bf16 weights across nodes at 50 GB/s
    assert any("weight sync ~2.9 s" in n and "145.4 GB" in n for n in full.notes), full.notes
    # vLLM gets LoRA merged: the adapted linears (70.2 B) each step, the other 2.5 B (embeddings, ...) once
    assert any("weight sync ~0.5 s" in n and "140.4 GB of bf16 merged LoRA weights" in n and "other 5.0 GB once" in n
               and "not counted" in n and "offloaded" in n for n in lora.notes), lora.notes  # the preset offloads
    # the native engine carries the adapters: only they travel
    assert any("weight sync ~" in n and "GB of bf16 LoRA adapters" in n for n in native_lora.notes), native_lora.notes


def test_native_lora_engine_counts_adapters_and_base_copy():
    """The native engine merges LoRA adapters into a kept copy of the adapted base weights; vLLM gets merged weights
    from the trainers and holds neither."""
    full = plan_job(preset("h100x2", "data.task=repeat"))
    lora = plan_job(preset("h100x2", "data.task=repeat", "model.lora_rank=32"))
    attn = plan_job(preset("h100x2", "data.task=repeat", "model.lora_rank=32", "model.lora_targets=q_proj,v_proj"))
    term = "LoRA adapters + base copy"
    assert term not in full.memory_table and term in lora.memory_table
    shape = CATALOGUE["Qwen2.5-1.5B"]
    est, _ = memory.rollout_memory(shape, tp=1, card_gb=80, utilization=0.85, seq_len=640, max_num_seqs=64,
                                   lora_rank=32, lora_base_copy=shape.linear_weights())
    assert est.gpu[term] * 1e9 == pytest.approx(4 * shape.lora_params(32) + 2 * shape.linear_weights())
    assert est.gpu[term] > 0.9 * 2 * shape.linear_weights() / 1e9  # the base copy dominates
    assert attn.memory_table != lora.memory_table
