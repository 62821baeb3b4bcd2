"""The rollout engine interface, and the native engine behind it.

Every engine the loop drives (the native engine, vLLM, a test's stand-in) has the same small surface, so the loop
never asks which kind it holds:

    generate(prompts, n, seed[, temperature]) -> one list of n Completions per prompt (temperature: None or left
                               out = the engine's own; 0 = greedy; validation passes it)
    connect(link)              join the weight sync (the trainers' first send follows)
    receive_weights()          take one sync from the trainers into the model
    sleep() / wake(tags)       give GPU memory back while the trainer on the same GPU updates, and take it again
    memory_stats() -> dict     peak GPU memory of the generating process (empty where it is not this process's)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from grpo.rollout import Completion, NativeEngine
from grpo.weight_sync import TensorSpec, WeightReceiver

WEIGHTS, KV_CACHE = "weights", "kv_cache"  # vLLM's sleep-mode tags


@dataclass(frozen=True)
class SyncLink:
    """Where an engine gets its weights. Engines inside the job's processes receive on `group` (the job's sync
    group, `src` the sending trainer); engines with worker processes of their own (vLLM) join a group of their own
    at (host, port) as ranks rank_offset.. of world_size, on `backend`."""

    specs: list[TensorSpec]
    bucket_bytes: int
    lora: bool = False  # only the adapters travel (the native engine merges them into a kept base)
    group: object = None
    src: int = 0
    device: torch.device | None = None
    host: str = ""
    port: int = 0
    rank_offset: int = 0
    world_size: int = 0
    backend: str = "gloo"


class Engine(Protocol):
    def generate(self, prompts: list[list[int]], n: int, seed: int,
                 temperature: float | None = None) -> list[list[Completion]]: ...

    def connect(self, link: SyncLink) -> None: ...

    def receive_weights(self) -> None: ...

    def sleep(self) -> None: ...

    def wake(self, tags: tuple[str, ...] = (WEIGHTS, KV_CACHE)) -> None: ...

    def memory_stats(self) -> dict: ...


class NativeRollout:
    """The native engine (grpo.rollout) behind the Engine interface. Asleep, it holds no KV cache (nor the CUDA
    graph captured over it); its weights stay, since a sync writes into them in place."""

    def __init__(self, engine: NativeEngine):
        self.engine = engine
        self.receiver = None
        self.merged = None

    def generate(self, prompts: list[list[int]], n: int, seed: int,
                 temperature: float | None = None) -> list[list[Completion]]:
        return self.engine.generate(prompts, n, seed, temperature=temperature)

    def connect(self, link: SyncLink) -> None:
        from grpo.policy import MergedAdapters

        self.receiver = WeightReceiver(link.specs, link.group, src=link.src, bucket_bytes=link.bucket_bytes,
                                       device=link.device)
        # full fine-tuning sends every weight; LoRA sends the adapters (the base was loaded from the same checkpoint)
        self.merged = MergedAdapters(self.engine.model) if link.lora else None

    def receive_weights(self) -> None:
        weights = self.receiver.receive()
        if self.merged is not None:
            self.merged.load(weights)
        else:
            self.engine.load_weights(weights)

    def sleep(self) -> None:
        self.engine.release_cache()
        if self.engine.device.type == "cuda":
            torch.cuda.empty_cache()

    def wake(self, tags: tuple[str, ...] = (WEIGHTS, KV_CACHE)) -> None:
        pass  # the cache is allocated again by the next generate

    def memory_stats(self) -> dict:
        device = self.engine.device
        if device.type != "cuda":
            return {}
        free, total = torch.cuda.mem_get_info(device)
        return {"gpu_peak_gib": torch.cuda.max_memory_reserved(device) / 2**30,
                "gpu_peak_alloc_gib": torch.cuda.max_memory_allocated(device) / 2**30,
                "device_used_gib": (total - free) / 2**30}
