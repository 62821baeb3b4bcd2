"""GPU + vLLM (0.24 on the GPU test machine): a LoRA run's weights reach a real vLLM engine merged.

The trainer is the production policy (grpo.policy.build_policy) of a tiny checkpoint with LoRA on every linear layer,
FSDP2 over a one-rank NCCL mesh with its shards offloaded to the host (as in the h100x8-lora preset), and B set to
random non-zero values (peft starts B at zero, which would make the merged model the base). It sends what the loop
sends to vLLM (`sync_named_tensors(..., merge_lora=True)`): every weight at first, then only the merged linears.
vLLM's greedy tokens must be the argmax of the merged model (W + (alpha/r) B A computed in float64 from the trainer's
tensors, loaded into a transformers model) up to bf16 near-ties, and differ from the base model's; a second sync with
new B values must move the engine again while the weights sent once (norms, embeddings, LM head) stay.
Layouts as in test_vllm_gpu: the engine beside the trainer on one GPU (gloo) or on GPU 1 (NCCL).
"""

import importlib.util
import json
import os
import threading

import pytest
import torch

from test_vllm_gpu import (EOS, NEW, PROMPTS, assert_within_bf16_noise, compare, free_port, start_engine,
                           vllm_test_env, write_checkpoint)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vllm")]

NUM_GPUS = torch.cuda.device_count()  # now: vLLM's import and its engine start change what later calls see
LORA = dict(lora_rank=8, lora_alpha=16, lora_targets="all-linear")


@torch.no_grad()
def randomize_b(policy, seed: int) -> None:
    from grpo.policy import copy_rows, sharded_named_parameters

    gen = torch.Generator().manual_seed(seed)
    for name, p in sharded_named_parameters(policy):
        if ".lora_B." in name:
            copy_rows(p, torch.randn(p.shape, generator=gen) * 0.3)


@torch.no_grad()
def merged_model(ckpt: str, policy):
    """The checkpoint as transformers loads it, with W + (alpha/r) B A (float64, then bf16) for every adapted linear,
    from the trainer's own tensors gathered whole."""
    from transformers import AutoModelForCausalLM

    from grpo.policy import ADAPTER, gather_full, hf_name, sharded_named_parameters

    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16).to("cuda:0").eval()
    own = dict(model.named_parameters())
    params = dict(sharded_named_parameters(policy))
    for name, p in params.items():
        if name.endswith(".base_layer.weight"):
            module = name.removesuffix(".base_layer.weight")
            w = gather_full(p).double()
            a = gather_full(params[f"{module}.lora_A.{ADAPTER}.weight"]).double()
            b = gather_full(params[f"{module}.lora_B.{ADAPTER}.weight"]).double()
            assert torch.equal(own[hf_name(name)], w.to(torch.bfloat16)), f"{name}: base differs from the checkpoint"
            own[hf_name(name)].copy_((w + policy.lora.scaling * b @ a).to(torch.bfloat16))
    return model


def send_in_thread(sender, *, port: int, backend: str, groups: dict, errors: list) -> threading.Thread:
    """Trainer rank 0: create the sync group once (rank 0, the store's host), then send."""
    from grpo.weight_sync import StatelessGroup

    def run():
        try:
            torch.cuda.set_device(0)
            if "sync" not in groups:
                groups["sync"] = StatelessGroup(host="127.0.0.1", port=port, rank=0, world_size=2, backend=backend)
                sender.group = groups["sync"]
            sender.send()
            torch.cuda.synchronize()
        except BaseException as e:  # noqa: BLE001  (re-raised in the test's thread)
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    return t


def greedy_tokens(out) -> list:
    return [g[0].token_ids for g in out]


@pytest.mark.parametrize("layout", ["1gpu-gloo", "2gpu-nccl"])
def test_lora_merged_weights_in_vllm(tmp_path, layout):
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh
    from transformers import AutoModelForCausalLM

    from grpo.config import ModelConfig
    from grpo.policy import build_policy, sync_named_tensors
    from grpo.rollout import NativeEngine
    from grpo.weight_sync import WeightSender

    if layout == "2gpu-nccl" and NUM_GPUS < 2:
        pytest.skip("needs 2 GPUs")
    vllm_test_env()
    ckpt = str(tmp_path / "tiny-qwen2")
    write_checkpoint(ckpt)
    device = torch.device("cuda:0")
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                            device_id=device)
    engine, result = None, {"layout": layout, "card": torch.cuda.get_device_name(0)}
    try:
        mesh = DeviceMesh.from_group(dist.group.WORLD, device_type="cuda")
        cfg = ModelConfig(path=ckpt, dtype="bfloat16", param_offload=True, **LORA)
        policy = build_policy(cfg, mesh, seed=0, trainable=True, device=device)
        randomize_b(policy, seed=1)
        named, static = sync_named_tensors(policy, merge_lora=True)
        sender = WeightSender(named, None, src=0, bucket_bytes=1 << 20, dtype=torch.bfloat16, static=static,
                              device=device)
        adapted = [s.name for s in sender.specs if not s.static]
        assert len(adapted) == 7 * 2 and {item.mode for row in sender.items for item in row} == {"rows"}
        base = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16).to(device).eval()
        base_greedy = greedy_tokens(NativeEngine(base, pad_id=0, eos_id=EOS, max_new_tokens=NEW,
                                                 temperature=0.0).generate(PROMPTS, n=1, seed=0))
        norm = base.model.norm.weight.float().tolist()
        del base

        engine, backend = start_engine(ckpt, layout)
        result["vllm"] = engine._vllm.__version__
        port, groups, previous = free_port(), {}, base_greedy
        for round_ in range(2):
            if round_ == 1:
                randomize_b(policy, seed=2)  # "a training step": only the adapters move
            errors = []
            thread = send_in_thread(sender, port=port, backend=backend, groups=groups, errors=errors)
            if round_ == 0:  # joined once; every later sync reuses the group
                assert engine.join_weight_sync(sender.specs, host="127.0.0.1", port=port, rank_offset=1,
                                               world_size=2, backend=backend, bucket_bytes=1 << 20) == [1]
            loaded = engine.receive_weights()
            thread.join()
            assert not errors, errors
            assert loaded == (len(sender.specs) if round_ == 0 else len(adapted))
            rpc = lambda name, rows: engine.llm.collective_rpc(  # noqa: E731
                "grpo_param_values", kwargs={"name": name, "rows": rows})[0]
            assert rpc("model.norm.weight", 256) == norm, "a weight sent once must stay"
            ref = merged_model(ckpt, policy)
            o_proj = torch.tensor(rpc("model.layers.1.self_attn.o_proj.weight", 256))  # not stacked by vLLM
            torch.testing.assert_close(o_proj, ref.model.layers[1].self_attn.o_proj.weight.float().cpu(),
                                       rtol=2**-7, atol=1e-5)  # one bf16 ulp: float32 merge vs float64
            greedy = engine.generate(PROMPTS, n=1, seed=0)
            stats = compare(ref, PROMPTS, greedy)
            stats["differs_from_previous"] = greedy_tokens(greedy) != previous
            result[f"greedy_round{round_}"] = stats
            assert stats["differs_from_previous"], "the merged weights did not change the engine's output"
            # vLLM may take another token only where the trainer's top two are closer than bf16 noise (the trainer's own
            # bf16 log-prob error against float32, measured on the same tokens; 0.0625 seen on an H200)
            assert stats["worst_argmax_gap"] <= stats["trainer_bf16_vs_fp32_max"] + 0.02, stats
            assert_within_bf16_noise(stats)
            previous = greedy_tokens(greedy)
            del ref
    finally:
        print("VLLM_LORA_RESULT " + json.dumps(result))
        if os.environ.get("OUT"):
            with open(os.path.join(os.environ["OUT"], f"vllm_lora_{layout}.json"), "w") as f:
                json.dump(result, f, indent=1)
        if engine is not None:
            engine.shutdown()
        dist.destroy_process_group()
