"""The vLLM rollout engine (the `vllm` extra, vLLM 0.24 to 0.33). The only module that imports vllm, and only inside
functions, so the rest of the package (and this module's pure parts) work without it.

Layout decision, for one Slurm task per GPU with trainer and rollout ranks in one torch.distributed job:
- vLLM runs its own workers (its default multiprocess engine; TP workers spawned by the first rollout task of each
  TP group, on the GPUs of its node), NOT `distributed_executor_backend="external_launcher"`. An in-process engine
  (external_launcher, or VLLM_ENABLE_V1_MULTIPROCESSING=0) takes the process's existing default group as vLLM's
  world (`init_distributed_environment`: ranks = range(world_size)) and calls `new_group` and an all_reduce over
  every rank of it: in our job that world holds the trainer ranks, which would have to join every group vLLM
  creates. external_launcher fits only a colocated layout (every rank trains and generates).
- New weights reach the workers through a worker extension (`GrpoWorkerExtension`) that runs OUR receiver
  (`grpo.weight_sync.WeightReceiver`) over a `StatelessGroup` spanning trainer rank 0 and every engine worker, then
  calls the model's own `load_weights` (HF names; vLLM stacks q/k/v and gate/up and slices for TP itself). Not vLLM's
  native weight-transfer API: its signature changed between the releases we support (0.24's
  `start_weight_update(is_checkpoint_format=...)` is gone in 0.33, `update_weights` takes a list in 0.33), its
  trainer side gathers every parameter on every trainer rank one at a time (no overlap of gather and broadcast, the
  3.7x-of-the-wire pattern measured in GPU_NOTES.md), and one protocol for every engine is the design.
- LoRA runs sync MERGED weights: for every LoRA-adapted linear the trainer sends W_base + (alpha/r) B A under the
  Hugging Face base name (`model.layers.0.self_attn.q_proj.weight`, no `.base_layer`), in the model dtype, and every
  other weight as it is; the engine loads them through the same `load_weights` path as full fine-tuning, and runs
  with no LoRA of its own (`enable_lora` stays off), so nothing vLLM-version-specific is needed. Each trainer rank
  merges its own rows (its shards of W and B, A gathered whole) when the weight's bucket is filled
  (`grpo.policy.merged_named_tensors`). The other weights (embeddings, norms, biases, the LM head, non-adapted
  linears) never change in a LoRA run: the first sync sends them, later syncs only the merged ones (`static`
  tensors, grpo.weight_sync). Why not adapters: vLLM 0.24 to 0.33 take a LoRA adapter only from a folder
  (`LoRARequest` is path-only; in-memory tensors need a monkey-patch of the private
  `LRUCacheWorkerLoRAManager._load_adapter`, as verl does), and generation through the punica LoRA kernels is slower
  than with merged weights. The cost is bytes on the wire: a 72B model in bf16 is ~145 GB (the first sync; later
  ones ~140 GB with all-linear targets), about 0.5 s inside one node at the measured 300 GB/s (GPU_NOTES.md),
  against minutes per step for that preset (h100x8-lora). The native engine carries the adapters itself and receives
  only them.
- Every method and attribute of the extension starts with `grpo_` / `_grpo_`: vLLM asserts that an extension adds
  no name its Worker has, and 0.33's Worker owns update_weights, start_weight_update, reload_weights and more.
- After every update the prefix cache is reset (no weight path in vLLM does it): GRPO repeats prompts, and a stale
  cache would mix the old weights' KV into new rollouts.
- A GRPO group is one request with n = group size and its own seed (vLLM gives child i the seed s + i); copies of a
  prompt sharing one seeded SamplingParams would come out identical. Seeds are spaced by n so no two children share
  one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable

import torch

from grpo.rollout import Completion
from grpo.weight_sync import DEFAULT_BUCKET_BYTES, StatelessGroup, TensorSpec, WeightReceiver

SUPPORTED = ((0, 24), (0, 34))  # [0.24, 0.34)
EXTENSION = "grpo.vllm_engine.GrpoWorkerExtension"


def check_version(version: str) -> None:
    """ValueError unless `version` is in the supported range."""
    try:
        major_minor = tuple(int(x) for x in version.split(".")[:2])
    except ValueError:
        raise ValueError(f"vllm {version!r}: cannot read the version; install vllm>=0.24,<0.34") from None
    if not SUPPORTED[0] <= major_minor < SUPPORTED[1]:
        raise ValueError(f"vllm {version} is not supported: install vllm>=0.24,<0.34 (pip install -e '.[vllm]')")


@dataclass(kw_only=True)
class VLLMSettings:
    model_path: str  # a Hugging Face folder (config + tokenizer); its weights are not read with load_format="dummy"
    tensor_parallel: int = 1  # GPUs of one engine, inside one node
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    eos_ids: tuple[int, ...] = ()  # stop tokens besides the model's own EOS
    max_model_len: int  # prompt + response
    max_num_seqs: int = 256
    gpu_memory_utilization: float = 0.85
    dtype: str = "bfloat16"
    seed: int = 0
    load_format: str = "dummy"  # the trainer pushes the real weights before the first rollout
    enforce_eager: bool = False
    ignore_eos: bool = False
    # colocated with a trainer: sleep after each generation. 2 drops the weights too (full fine-tuning re-sends
    # them all); 1 keeps them in host memory (LoRA re-sends only the adapted ones). 0: never sleeps
    sleep_level: int = 0


def engine_args(s: VLLMSettings) -> dict:
    """Keyword arguments of `vllm.LLM` for a rollout engine (the same in 0.24 and 0.33)."""
    if s.tensor_parallel < 1:
        raise ValueError(f"rollout.tensor_parallel={s.tensor_parallel}: must be at least 1 for a vLLM engine")
    if s.max_new_tokens < 1 or s.max_model_len <= s.max_new_tokens:
        raise ValueError(f"max_model_len={s.max_model_len} must exceed max_new_tokens={s.max_new_tokens}")
    return dict(
        model=s.model_path, tensor_parallel_size=s.tensor_parallel, dtype=s.dtype, seed=s.seed,
        gpu_memory_utilization=s.gpu_memory_utilization, max_model_len=s.max_model_len, max_num_seqs=s.max_num_seqs,
        load_format=s.load_format, enforce_eager=s.enforce_eager, enable_prefix_caching=True,
        worker_extension_cls=EXTENSION, enable_sleep_mode=s.sleep_level > 0,
        # log-probs after temperature: what the trainer's log-prob at that temperature is compared with
        logprobs_mode="processed_logprobs",
    )


def sampling_args(s: VLLMSettings, *, n: int, seed: int, index: int, temperature: float | None = None) -> dict:
    """Keyword arguments of `vllm.SamplingParams` for prompt `index` of a batch: one request per GRPO group.
    `temperature` overrides the settings' (validation: 0, greedy)."""
    return dict(n=n, temperature=s.temperature if temperature is None else temperature, top_p=s.top_p, top_k=s.top_k,
                max_tokens=s.max_new_tokens,
                logprobs=0, seed=seed * 1_000_003 + index * n, detokenize=False, ignore_eos=s.ignore_eos,
                stop_token_ids=None if s.ignore_eos else list(s.eos_ids) or None)


def to_completions(outputs) -> list[list[Completion]]:
    """vLLM RequestOutputs (one per prompt, in prompt order) -> our Completions, samples in index order."""
    groups = []
    for out in outputs:
        group = []
        for c in sorted(out.outputs, key=lambda c: c.index):
            ids = [int(t) for t in c.token_ids]
            logps = [float(pos[t].logprob) for pos, t in zip(c.logprobs, ids)] if c.logprobs is not None else []
            if len(logps) != len(ids):
                raise RuntimeError(f"vLLM returned {len(logps)} log-probs for {len(ids)} tokens")
            group.append(Completion(ids, logps, "stop" if c.finish_reason == "stop" else "length"))
        groups.append(group)
    return groups


class VLLMEngine:
    """A vLLM engine on the rollout ranks, with the NativeEngine's `generate` and a weight-sync hook-up.

    Construct it on the first rollout task of each TP group; vLLM starts its worker processes itself.
    """

    def __init__(self, settings: VLLMSettings, **extra):
        import vllm

        check_version(vllm.__version__)
        if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0" and _in_job_group():
            raise ValueError("VLLM_ENABLE_V1_MULTIPROCESSING=0 puts vLLM in this process, whose torch.distributed "
                             "world holds the trainer ranks; unset it so vLLM runs its own worker processes")
        self.settings = settings
        self.llm = vllm.LLM(**{**engine_args(settings), **extra})
        self._vllm = vllm
        self._asleep: set[str] = set()  # sleep-mode tags now unmapped

    def generate(self, prompts: list[list[int]], n: int, seed: int,
                 temperature: float | None = None) -> list[list[Completion]]:
        """Sample `n` responses per prompt (one request per prompt, its own seed). Same return as NativeEngine."""
        if not prompts:
            return []
        vllm = self._vllm
        params = [vllm.SamplingParams(**sampling_args(self.settings, n=n, seed=seed, index=i,
                                                           temperature=temperature))
                  for i in range(len(prompts))]
        requests = [vllm.TokensPrompt(prompt_token_ids=[int(t) for t in p]) for p in prompts]
        return to_completions(self.llm.generate(requests, params, use_tqdm=False))

    def join_weight_sync(self, specs: list[TensorSpec], *, host: str, port: int, rank_offset: int, world_size: int,
                         backend: str = "nccl", bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> list[int]:
        """Every worker of this engine joins the sync group as rank rank_offset + its TP rank. Runs concurrently
        with trainer rank 0 creating the group (rank 0) at (host, port). Returns the workers' ranks."""
        return self.llm.collective_rpc("grpo_join_weight_sync", kwargs=dict(
            specs=[[s.name, list(s.shape), s.dtype, s.static] for s in specs], host=host, port=port,
            rank_offset=rank_offset, world_size=world_size, backend=backend, bucket_bytes=bucket_bytes))

    def receive_weights(self) -> int:
        """Receive one sync (concurrently with the trainers' `WeightSender.send`), load it, reset the prefix cache.
        Returns how many tensors each worker loaded."""
        counts = self.llm.collective_rpc("grpo_receive_weights")
        if not self.llm.reset_prefix_cache(reset_running_requests=True):
            raise RuntimeError("vLLM did not reset its prefix cache after a weight update")
        assert len(set(counts)) == 1, counts
        return counts[0]

    def connect(self, link) -> None:
        """The Engine interface's hook-up (grpo.engine.SyncLink): the workers join a group of their own."""
        self.join_weight_sync(link.specs, host=link.host, port=link.port, rank_offset=link.rank_offset,
                              world_size=link.world_size, backend=link.backend, bucket_bytes=link.bucket_bytes)

    def sleep(self) -> None:
        """Free the GPU for the trainer beside it (sleep mode: level 1 keeps the weights on the host, 2 drops
        them; both drop the KV cache and reset the prefix cache)."""
        if self.settings.sleep_level:
            self.llm.sleep(level=self.settings.sleep_level)
            self._asleep = {"weights", "kv_cache"}

    def wake(self, tags: tuple[str, ...] = ("weights", "kv_cache")) -> None:
        """Map memory back: the weights before a sync writes into them, the KV cache before a generation."""
        tags = [t for t in tags if t in self._asleep]
        if tags:
            self.llm.wake_up(tags=tags)
            self._asleep -= set(tags)

    def memory_stats(self) -> dict:
        """The whole GPU's memory in use right after a generation (the worker processes hold the engine's; this
        process sees only the device's total)."""
        if not torch.cuda.is_available():
            return {}
        free, total = torch.cuda.mem_get_info()
        return {"device_used_gib": (total - free) / 2**30}

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> int:
        raise TypeError("a vLLM engine's weights live in its worker processes: use join_weight_sync once, then "
                        "receive_weights() after every trainer send")

    def shutdown(self) -> None:
        engine = getattr(self.llm.llm_engine, "engine_core", None)
        if engine is not None and hasattr(engine, "shutdown"):
            engine.shutdown()


def _in_job_group() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


class GrpoWorkerExtension:
    """Mixed into vLLM's Worker by `worker_extension_cls`. vLLM never calls its __init__: state is set lazily.

    Reads from the worker only what both 0.24 and 0.33 give it: `self.device`, `self.rank`, `self.get_model()`.
    """

    def grpo_join_weight_sync(self, *, specs: list, host: str, port: int, rank_offset: int, world_size: int,
                              backend: str, bucket_bytes: int) -> int:
        rank = rank_offset + self.rank  # the worker's rank inside its engine (= its TP rank; data parallel is off)
        group = StatelessGroup(host=host, port=port, rank=rank, world_size=world_size, backend=backend)
        self._grpo_group = group
        specs = [TensorSpec(name, tuple(shape), dtype, static=static) for name, shape, dtype, static in specs]
        self._grpo_receiver = WeightReceiver(specs, group, src=0, bucket_bytes=bucket_bytes, device=self.device)
        return rank

    def grpo_receive_weights(self) -> int:
        receiver = getattr(self, "_grpo_receiver", None)
        if receiver is None:
            raise RuntimeError("grpo_receive_weights before grpo_join_weight_sync")
        count = [0]

        def counted():
            for item in receiver.receive():
                count[0] += 1
                yield item

        self.get_model().load_weights(weights=counted())
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return count[0]

    def grpo_param_values(self, name: str, rows: int) -> list:
        """The first `rows` rows of one of the model's (vLLM-named) parameters, as floats (for tests)."""
        params = dict(self.get_model().named_parameters())
        return params[name].detach()[:rows].float().cpu().tolist()
