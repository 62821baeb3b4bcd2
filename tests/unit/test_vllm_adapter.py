"""The vLLM adapter without vLLM: a STAND-IN for vLLM's Worker and model, shaped after the 0.24.0 and 0.33.0 wheels.

Where 0.33 differs from 0.24 (the version that runs on the GPU test machine) and the adapter depends on it:
- the Worker owns more names (reset_weights, shutdown_weight_transfer_engine, compute_weight_checksums, ...): the
  stand-in Worker classes carry every method/attribute name of each version's `Worker` + `WorkerBase` (read from the
  wheels' source with `ast`), and the extension is injected the way both versions' `init_worker` does it;
- Model Runner V2 is the default (its `model_runner.model` may be a wrapper): the extension reaches the model only
  through `Worker.get_model()`, which both versions have;
- 0.33 calls optional extension hooks (`init_worker_extension`); 0.24 does not, so the extension needs none.
The stand-in model loads Hugging Face names into stacked parameters (qkv_proj, gate_up_proj) the way vLLM's Qwen2
does, consuming the iterator lazily and copying each tensor at once.
"""

import socket
import types

import pytest
import torch
import torch.multiprocessing as mp

from grpo.vllm_engine import (GrpoWorkerExtension, VLLMSettings, check_version, engine_args, sampling_args,
                              to_completions)

WORKER_024 = set("""_check_weight_transfer_engine _maybe_get_memory_pool_context _scoped_allocator_max_split add_lora
annotate_profile apply_model check_health compile_or_warm_up_model determine_available_memory elastic_ep_execute
execute_dummy_batch execute_model finish_weight_update get_cache_block_size_bytes get_compilation_match_table
get_encoder_timing_stats get_kv_cache_spec get_kv_connector_handshake_metadata get_model get_model_inspection
get_supported_tasks init_device init_weight_transfer_engine initialize_from_config list_loras load_model pin_lora
profile reload_weights remove_lora reset_encoder_cache reset_mm_cache sample_tokens save_sharded_state
save_tensorized_model shutdown sleep start_weight_update take_draft_token_ids update_config update_max_model_len
update_weights vocab_size wake_up""".split())
WORKER_033 = WORKER_024 | set("""_compile_or_warm_up_model _get_cudagraph_capture_context _get_sleep_parameters
_init_workspace_and_model_runner _make_model_runner _maybe_activate_jit_monitor _restore_sleep_parameters
_save_sleep_parameters _set_draft_weight_update_target _start_weight_update _weight_checksum_prefix
checkpoint_prepare checkpoint_restore compute_weight_checksums discard get_draft_model
get_simple_cpu_offload_num_cpu_blocks get_supported_kv_cache_layouts handle_ft_command randomize_dummy_inputs
release_late_interaction_query_cache reset_weights set_kv_cache_layout shutdown_weight_transfer_engine
sleep_mode_backend start_draft_weight_update supports_draft_weight_updates synchronize_device""".split())
WORKER_ATTRS = {"device", "model_runner", "model_config", "rank", "local_rank", "parallel_config", "vllm_config",
                "weight_transfer_engine", "profiler"}  # instance attributes the worker sets


def standin_worker_class(names: set[str]):
    """A class with every name of a vLLM Worker; `get_model` works, the rest raise (they must never be reached)."""
    def unreachable(self, *a, **k):
        raise AssertionError("the extension called a vLLM Worker method it should not need")

    body = {name: unreachable for name in names}
    body["get_model"] = lambda self: self.model_runner.model
    return type("Worker", (type("WorkerBase", (), {}),), body)  # vLLM's Worker derives from WorkerBase


def inject(worker_class, ext):
    """What vLLM's WorkerWrapperBase.init_worker does with worker_extension_cls (0.24 and 0.33 alike)."""
    for attr in dir(ext):
        if attr.startswith("__"):
            continue
        assert not hasattr(worker_class, attr), f"extension attribute {attr!r} clashes with vLLM's Worker"
    worker_class.__bases__ = worker_class.__bases__ + (ext,)


@pytest.mark.parametrize("names", [WORKER_024, WORKER_033], ids=["vllm-0.24", "vllm-0.33"])
def test_extension_injects_without_clash(names):
    assert {"update_weights", "start_weight_update", "reload_weights", "reset_weights"} & names
    own = {a for a in vars(GrpoWorkerExtension) if not a.startswith("__")}
    assert own and all(a.startswith(("grpo_", "_grpo_")) for a in own), own
    assert not own & WORKER_ATTRS
    cls = standin_worker_class(names)
    inject(cls, GrpoWorkerExtension)
    assert hasattr(cls(), "grpo_receive_weights")

    class Clashing:
        def update_weights(self):  # the name older recipes used; 0.24 and 0.33 both own it
            pass

    with pytest.raises(AssertionError, match="update_weights"):
        inject(standin_worker_class(names), Clashing)


class StandinQwen2:
    """vLLM-style Qwen2 parameters: q/k/v stacked into qkv_proj, gate/up into gate_up_proj."""

    STACKED = [("qkv_proj", "q_proj", "q"), ("qkv_proj", "k_proj", "k"), ("qkv_proj", "v_proj", "v"),
               ("gate_up_proj", "gate_proj", 0), ("gate_up_proj", "up_proj", 1)]

    def __init__(self, hf: dict[str, torch.Tensor], *, q_rows: int, kv_rows: int, inter: int):
        qk = q_rows + kv_rows
        self.offsets = {"q": (0, q_rows), "k": (q_rows, qk), "v": (qk, qk + kv_rows), 0: (0, inter), 1: (inter, 2 * inter)}
        self.params = {}
        for name, t in hf.items():
            for stacked, part, shard in self.STACKED:
                if part in name:
                    name = name.replace(part, stacked)
                    if name not in self.params:
                        rows = q_rows + 2 * kv_rows if stacked == "qkv_proj" else 2 * inter
                        self.params[name] = torch.full((rows, *t.shape[1:]), float("nan"), dtype=t.dtype)
                    break
            else:
                self.params[name] = torch.full_like(t, float("nan"))

    def named_parameters(self):
        return self.params.items()

    def load_weights(self, weights):
        loaded = set()
        for name, tensor in weights:
            for stacked, part, shard in self.STACKED:
                if part in name:
                    name = name.replace(part, stacked)
                    lo, hi = self.offsets[shard]
                    self.params[name][lo:hi].copy_(tensor)
                    break
            else:
                if name not in self.params:
                    raise ValueError(f"There is no module or parameter named {name!r}")
                self.params[name].copy_(tensor)
            loaded.add(name)
        return loaded


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


STATIC = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")  # as in a LoRA run: first sync only


def sync_worker(rank: int, port: int, names_key: str) -> None:
    """rank 0: a trainer process; rank 1: a vLLM worker process (its own world, the stand-in Worker)."""
    from grpo.tiny import build_tiny_model
    from grpo.weight_sync import StatelessGroup, WeightSender

    torch.set_num_threads(1)
    hf = dict(build_tiny_model(seed=0).named_parameters())
    if rank == 0:
        group = StatelessGroup(host="127.0.0.1", port=port, rank=0, world_size=2, backend="gloo")
        sender = WeightSender(list(hf.items()), group, src=0, bucket_bytes=4096, dtype=torch.bfloat16, static=STATIC)
        sender.send()
        sender.send()  # a second sync over the same group: the receiver is reused; the static tensors stay home
        return
    cfg = build_tiny_model(seed=0).config
    head = cfg.hidden_size // cfg.num_attention_heads
    model = StandinQwen2({k: v.to(torch.bfloat16) for k, v in hf.items()}, q_rows=cfg.num_attention_heads * head,
                         kv_rows=cfg.num_key_value_heads * head, inter=cfg.intermediate_size)
    cls = standin_worker_class(WORKER_033 if names_key == "0.33" else WORKER_024)
    inject(cls, GrpoWorkerExtension)
    worker = cls.__new__(cls)  # vLLM never runs the extension's __init__
    worker.device, worker.rank = torch.device("cpu"), 0
    worker.model_runner = types.SimpleNamespace(model=model)
    specs = WeightSender(list(hf.items()), None, src=0, bucket_bytes=4096, dtype=torch.bfloat16, static=STATIC).specs
    got_rank = worker.grpo_join_weight_sync(specs=[[s.name, list(s.shape), s.dtype, s.static] for s in specs],
                                            host="127.0.0.1", port=port, rank_offset=1, world_size=2,
                                            backend="gloo", bucket_bytes=4096)
    assert got_rank == 1
    for first in (True, False):
        assert worker.grpo_receive_weights() == len(hf) - (0 if first else len(STATIC))
        for name, p in model.params.items():
            assert torch.isnan(p).any() == (not first and name in STATIC), f"{name} loaded wrongly"
        q, k, v = (hf[f"model.layers.1.self_attn.{x}_proj.weight"].to(torch.bfloat16) for x in "qkv")
        assert torch.equal(model.params["model.layers.1.self_attn.qkv_proj.weight"], torch.cat([q, k, v]))
        gate, up = (hf[f"model.layers.0.mlp.{x}_proj.weight"].to(torch.bfloat16) for x in ("gate", "up"))
        assert torch.equal(model.params["model.layers.0.mlp.gate_up_proj.weight"], torch.cat([gate, up]))
        if first:
            assert torch.equal(model.params["lm_head.weight"], hf["lm_head.weight"].to(torch.bfloat16))
            norm = hf["model.norm.weight"][:2].bfloat16().tolist()
            assert worker.grpo_param_values("model.norm.weight", 2) == norm
        for p in model.params.values():
            p.fill_(float("nan"))


@pytest.mark.parametrize("names_key", ["0.24", "0.33"])
def test_worker_extension_receives_into_stacked_params(names_key):
    mp.spawn(sync_worker, args=(free_port(), names_key), nprocs=2, join=True)


def test_sampling_one_request_per_group_with_distinct_child_seeds():
    s = VLLMSettings(model_path="m", max_new_tokens=64, max_model_len=128, temperature=0.9, eos_ids=(7,))
    n = 5
    seen = set()
    for step in (1, 2):
        for i in range(8):
            args = sampling_args(s, n=n, seed=step, index=i)
            assert args["n"] == n and args["max_tokens"] == 64 and args["logprobs"] == 0
            assert args["temperature"] == 0.9 and args["stop_token_ids"] == [7] and args["detokenize"] is False
            children = {args["seed"] + j for j in range(n)}  # vLLM's parallel sampling: child j gets seed + j
            assert not children & seen
            seen |= children


def test_engine_args_and_version_check():
    s = VLLMSettings(model_path="/m", tensor_parallel=4, max_new_tokens=512, max_model_len=1024)
    args = engine_args(s)
    assert args["worker_extension_cls"] == "grpo.vllm_engine.GrpoWorkerExtension"
    assert args["tensor_parallel_size"] == 4 and args["load_format"] == "dummy"
    assert args["logprobs_mode"] == "processed_logprobs" and args["enable_prefix_caching"]
    assert "distributed_executor_backend" not in args  # vLLM's own workers, see the module docstring
    with pytest.raises(ValueError, match="max_model_len"):
        engine_args(VLLMSettings(model_path="/m", max_new_tokens=512, max_model_len=512))
    with pytest.raises(ValueError, match="tensor_parallel"):
        engine_args(VLLMSettings(model_path="/m", tensor_parallel=0, max_new_tokens=8, max_model_len=64))
    for ok in ("0.24.0", "0.33.0", "0.33.1rc1"):
        check_version(ok)
    for bad in ("0.23.2", "0.34.0", "1.0.0", "dev"):
        with pytest.raises(ValueError):
            check_version(bad)


def test_to_completions_reads_request_outputs():
    lp = lambda x: types.SimpleNamespace(logprob=x)  # noqa: E731  (vllm.logprobs.Logprob)
    out = types.SimpleNamespace(outputs=[  # vLLM may list children out of order; `index` is the sample number
        types.SimpleNamespace(index=1, token_ids=(4, 9), finish_reason="length",
                              logprobs=[{4: lp(-0.5), 2: lp(-1.0)}, {9: lp(-0.25)}]),
        types.SimpleNamespace(index=0, token_ids=[3, 7], finish_reason="stop", logprobs=[{3: lp(-1.5)}, {7: lp(-2.0)}]),
    ])
    (group,) = to_completions([out])
    assert [c.token_ids for c in group] == [[3, 7], [4, 9]]
    assert [c.logprobs for c in group] == [[-1.5, -2.0], [-0.5, -0.25]]
    assert [c.finish_reason for c in group] == ["stop", "length"]
