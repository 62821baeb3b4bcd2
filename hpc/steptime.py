"""Step-time model of a GRPO step, phase by phase, from bytes, FLOPs and the constants of grpo.hardware. No torch.

Phases (seconds per GRPO step):
- generation: per engine, waves of as many sequences as its KV cache holds; a wave is one prefill (FLOPs) and
  `new_tokens` decode steps, each bound by the bytes it reads (the engine's weight shard and the KV cache) or by its
  FLOPs, whichever is slower, plus a per-step overhead and the tensor-parallel all-reduces;
- reward: toy tasks in the driver, one response at a time; dataset rewards in reward.workers processes
  (grpo.scoring), plus the pool's pipe round trip per response;
- update: the trainer's forward and backward passes (FLOPs at the fitted MFU, attention included), one more forward
  with activation checkpointing (recompute), the reference and old log-prob passes; per micro-batch the slower of
  the FLOPs and FSDP2's gathers and reduce-scatters (over NVLink inside a node, the NICs across nodes) and, with
  parameter offload, the host copies;
- optimizer: AdamW on the GPU (bytes), or its state over PCIe (optimizer offload), or on the host (parameter offload);
- sync: the weights from the trainers to the engines (NVLink, NICs or CUDA IPC on the same GPU);
- swap: colocated only, the engine's sleep and wake between phases, and the optimizer state's trip to the host and
  back when the planner swaps it out for generation (`optimizer_swap_s`).

Responses are counted at full length (`new_tokens`): exact for benchmarks with ignore_eos, an upper bound otherwise.
How the phases add up depends on the layout (Prediction.total).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from grpo import hardware as hw
from grpo.hardware import GpuSpec
from hpc.models import ModelShape


# ------------------------------------------------------------------------------------------------ FLOPs and bytes

def linear_params(shape: ModelShape) -> int:
    """Parameters that take part in a matmul per token: every block, and the LM head (the embedding is a lookup)."""
    return shape.layers * shape.block_params + shape.vocab * shape.hidden


def attention_flops(shape: ModelShape, context: float) -> float:
    """Per token, all layers: scores (q.k) and the weighted sum (p.v) over `context` earlier tokens."""
    return 4.0 * shape.layers * shape.heads * shape.head_dim * context


def forward_flops(shape: ModelShape, tokens: float, seq_len: int) -> tuple[float, float]:
    """(blocks, LM head) FLOPs of one forward pass over `tokens` tokens of sequences of `seq_len` (causal attention:
    a token attends to half the sequence on average)."""
    head = 2.0 * shape.vocab * shape.hidden * tokens
    blocks = 2.0 * shape.layers * shape.block_params * tokens + attention_flops(shape, seq_len / 2) * tokens
    return blocks, head


# ------------------------------------------------------------------------------------------------------ generation

def decode_step_s(shape: ModelShape, card: GpuSpec, *, engine: str, tp: int, batch: int, context: float) -> float:
    """One decode step of an engine of `tp` GPUs for `batch` sequences that each read `context` cached tokens."""
    weights = 2.0 * shape.params / tp
    kv = batch * context * shape.kv_bytes_per_token() / tp
    flops = batch * (2.0 * linear_params(shape) + attention_flops(shape, context)) / tp
    t_bytes = (weights + kv) / (card.hbm_gbps * 1e9 * hw.DECODE_HBM_EFF)
    t_flops = flops / (card.bf16_tflops * 1e12 * hw.DECODE_FLOPS_EFF)
    comm = 2 * shape.layers * hw.TP_ALLREDUCE_S if tp > 1 else 0.0
    return max(t_bytes, t_flops) + hw.DECODE_STEP_OVERHEAD_S[engine] + comm


def generation_s(shape: ModelShape, card: GpuSpec, *, engine: str, tp: int, engines: int, responses: int,
                 prompt_len: int, new_tokens: int, kv_seqs: int, samples_per_prompt: int = 1) -> float:
    """All responses over `engines` engines of `tp` GPUs each holding `kv_seqs` sequences in its KV cache.

    vLLM runs waves of at most `kv_seqs` sequences and reads the KV cache it has filled (on average the prompt and
    half the response), and prefills each prompt once for its `samples_per_prompt` samples (prefix caching). The
    native engine runs every row of its share in one batch over a static cache of the full length
    (grpo.rollout.NativeEngine), so it reads the whole cache every step, and prefills every row.
    """
    rows = math.ceil(responses / engines)
    per_wave = rows if engine == "native" else max(1, min(kv_seqs, rows))
    total, left = 0.0, rows
    while left > 0:
        batch = min(per_wave, left)
        shared = 1 if engine == "native" else samples_per_prompt
        prefill = sum(forward_flops(shape, batch * prompt_len / shared, prompt_len)) / tp
        total += prefill / (card.bf16_tflops * 1e12 * hw.PREFILL_FLOPS_EFF)
        context = prompt_len + (new_tokens if engine == "native" else new_tokens / 2)
        total += new_tokens * decode_step_s(shape, card, engine=engine, tp=tp, batch=batch, context=context)
        left -= batch
    return total


# ---------------------------------------------------------------------------------------------------------- update

@dataclass(frozen=True)
class TrainSetup:
    """What the update's time depends on besides the model and the card."""

    gpus: int  # trainer ranks (the FSDP2 mesh)
    nodes: int  # nodes the mesh spans (> 1: FSDP2's collectives cross the NICs)
    tokens_per_micro_batch: int
    activation_checkpointing: bool
    param_offload: bool  # FSDP2 CPUOffloadPolicy: shards on the host, copied in per gather; AdamW on the host
    optimizer_offload: bool  # AdamW state on the host between optimizer steps
    lora_rank: int = 0
    lora_layers: int = 0  # adapted linear layers (peft layers: a per-call overhead)


def fsdp_link_gbps(card: GpuSpec, nodes: int) -> float:
    return hw.NIC_GBPS if nodes > 1 else hw.nvlink_sync_gbps(card)


def update_s(shape: ModelShape, card: GpuSpec, setup: TrainSetup, *, responses: int, seq_len: int,
             reference: bool, old_logprobs: bool, mini_batches: int) -> float:
    """Old and reference log-prob passes and the policy's forward + backward over every response of the step."""
    tokens_per_gpu = responses * seq_len / setup.gpus
    micro = mini_batches * math.ceil(tokens_per_gpu / mini_batches / setup.tokens_per_micro_batch)
    tokens = tokens_per_gpu / micro  # per micro-batch
    blocks, head = forward_flops(shape, tokens, seq_len)
    lora = setup.lora_rank > 0
    # backward: gradients of activations and of weights (2 forwards), of activations only when the base is frozen
    train = blocks + head + (1 if lora else 2) * (blocks + head) + (blocks if setup.activation_checkpointing else 0)
    peak = card.bf16_tflops * 1e12 * hw.TRAIN_FLOPS_EFF
    link = fsdp_link_gbps(card, setup.nodes) * 1e9
    share = (setup.gpus - 1) / setup.gpus  # of a gathered tensor, what comes from the other ranks
    gather = 2.0 * shape.params * share / link if setup.gpus > 1 else 0.0  # bf16 weights, every pass
    trainable = shape.lora_params(setup.lora_rank) if lora else shape.params
    reduce = 4.0 * trainable * share / link if setup.gpus > 1 else 0.0  # fp32 gradient reduce-scatter
    pcie = card.pcie_gbps * 1e9 * hw.PCIE_EFF
    shard_bytes = 2.0 if lora else 4.0  # a frozen LoRA base is kept in bf16, full fine-tuning's master in fp32
    host_in = shard_bytes * shape.params / setup.gpus / pcie if setup.param_offload else 0.0  # per gather
    host_out = 4.0 * trainable / setup.gpus / pcie if setup.param_offload else 0.0  # gradient shard
    calls = setup.lora_layers * hw.LORA_CALL_OVERHEAD_S

    def per_micro(flops: float, gathers: int, reduces: int, lora_calls: int) -> float:
        # FSDP2 prefetches the next block's gather while this one computes: the slower of the two sets the pace
        return max(flops / peak, gathers * gather + reduces * reduce, gathers * host_in + reduces * host_out) \
            + lora_calls * calls

    forward_only = per_micro(blocks + head, 1, 0, 1)
    passes = (1 if reference else 0) + (1 if old_logprobs else 0)
    # the update re-gathers in the backward (FSDP2 reshards after the forward); recompute reuses that gather
    return micro * (passes * forward_only + per_micro(train, 2, 1, 3 if setup.activation_checkpointing else 2))


def optimizer_s(shape: ModelShape, card: GpuSpec, setup: TrainSetup, *, mini_batches: int) -> float:
    """AdamW steps of one GRPO step (one per mini-batch) on each trainer rank's shard."""
    trainable = (shape.lora_params(setup.lora_rank) if setup.lora_rank else shape.params) / setup.gpus
    if setup.param_offload:
        return mini_batches * trainable / hw.HOST_ADAMW_PARAMS_PER_S
    step = trainable * hw.GPU_ADAMW_BYTES_PER_PARAM / (card.hbm_gbps * 1e9 * hw.MEMORY_BOUND_EFF)
    if setup.optimizer_offload:  # the two fp32 moments come in before the step and go back after it
        step += 2 * 8.0 * trainable / (card.pcie_gbps * 1e9 * hw.PCIE_EFF)
    return mini_batches * step


# ------------------------------------------------------------------------------------------------------------ sync

def sync_split_s(nbytes: float, card: GpuSpec, *, crosses_nodes: bool) -> float:
    """Trainer rank 0 broadcasts the bytes to every engine: NVLink inside a node, its NIC across nodes."""
    return nbytes / (1e9 * (hw.SYNC_GBPS_NETWORK if crosses_nodes else hw.nvlink_sync_gbps(card)))


def sync_colocated_s(nbytes: float, card: GpuSpec, *, nodes: int) -> float:
    """Each node's engines need the whole model; the trainers' FSDP2 shards are spread over every node. Each node
    gathers the shards it lacks once over its GPUs' NICs (one per GPU), spreads them over NVLink, and each engine
    takes its part through CUDA IPC on its own GPU."""
    cross = nbytes * (nodes - 1) / nodes / (hw.NIC_GBPS * 1e9) if nodes > 1 else 0.0
    return cross + nbytes / (hw.nvlink_sync_gbps(card) * 1e9) + nbytes / (hw.SYNC_GBPS_IPC * 1e9)


def optimizer_swap_s(state_gb: float, card: hw.GpuSpec) -> float:
    """The AdamW state of one GPU to pinned host memory before generation and back before the update (every GPU of a
    node copies at once: PCIe at hw.PCIE_EFF)."""
    return 2 * state_gb * 1e9 / (card.pcie_gbps * 1e9 * hw.PCIE_EFF)


def sync_one_gpu_s(nbytes: float) -> float:
    """Trainer and engine on the same GPU: a CUDA-IPC buffer (measured on the h100x1 loop)."""
    return nbytes / (hw.SYNC_GBPS_IPC * 1e9)


# ------------------------------------------------------------------------------------------------------ prediction

PHASES = ("generation", "reward", "update", "optimizer", "sync", "swap")


@dataclass
class Prediction:
    """Predicted seconds per phase of one candidate layout, and how they add up into a step."""

    layout: str  # "split", "split off-policy", "colocated"
    trainers: int
    rollout_gpus: int
    tp: int
    engines: int
    kv_seqs: int
    generation: float
    reward: float
    update: float
    optimizer: float
    sync: float
    swap: float = 0.0
    layout_note: str = ""  # shown in the label, e.g. "every saving on, as verl's seeds"

    @property
    def total(self) -> float:
        train = self.update + self.optimizer
        if self.layout == "split off-policy":  # engines generate batch k+1 while the trainers update on batch k
            return max(self.generation, train) + self.reward + self.sync
        return self.generation + self.reward + train + self.sync + self.swap

    @property
    def label(self) -> str:
        gpus = (f"{self.trainers} GPUs" if self.layout == "colocated"
                else f"{self.trainers} train + {self.rollout_gpus} generate")
        note = f" ({self.layout_note})" if self.layout_note else ""
        return f"{self.layout}{note} {gpus}, TP={self.tp}"

    def phases(self) -> dict[str, float]:
        return {p: getattr(self, p) for p in PHASES} | {"step": self.total}


def reward_s(responses: int, kind: str, workers: int = 1) -> float:
    if kind == "toy":  # scored in the driver
        return responses * hw.REWARD_MS[kind] / 1e3
    return responses * (hw.REWARD_MS[kind] / workers + hw.REWARD_POOL_MS) / 1e3
