"""Per-GPU memory model of the two roles, in GB (1e9 bytes), component by component.

Trainer (FSDP2 over T GPUs): sharded fp32 parameters, gradients and AdamW states (each offloadable to host memory),
the bf16 working set of the blocks FSDP2 has gathered (current and prefetched) plus the root (embeddings and LM
head), activations (block inputs only with checkpointing, plus one block recomputed), the log-prob kernel's
buffer, and the frozen reference (a bf16 sharded copy, or nothing for LoRA: adapters off).
Rollout (one engine per TP group inside a node): bf16 weights / TP, the KV cache for the concurrent sequences,
and a fixed overhead for activations, CUDA graphs and the CUDA context.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hpc.models import ModelShape

GB = 1e9
CUDA_CONTEXT_GB = 1.0  # context, NCCL buffers, allocator slack
ENGINE_OVERHEAD_GB = 3.0  # activations of a decode/prefill batch and CUDA graphs
LOGPROB_BUFFER_GB = 0.5  # the fused kernel's blocks: O(tokens x block), not O(tokens x vocab)


@dataclass
class Estimate:
    role: str
    gpu: dict[str, float] = field(default_factory=dict)  # component -> GB on each GPU
    host: dict[str, float] = field(default_factory=dict)  # component -> GB of host memory per GPU

    @property
    def gpu_total(self) -> float:
        return sum(self.gpu.values())

    @property
    def host_total(self) -> float:
        return sum(self.host.values())


TORCH_LOGIT_COPIES = 5  # the torch reference under autograd keeps z, z/T, log_softmax, softmax and p*z alive


def trainer_memory(shape: ModelShape, *, gpus: int, tokens_per_micro_batch: int, lora_rank: int,
                   param_offload: bool, optimizer_offload: bool, activation_checkpointing: bool,
                   reference: bool, reference_offload: bool, logprob: str = "fused",
                   response_tokens: int | None = None, defer_grad_sync: bool = False) -> Estimate:
    """Memory of one trainer GPU when the model is sharded over `gpus` GPUs.

    `logprob`: "fused" (the Triton kernel: a fixed buffer) or "torch" (float32 [response tokens, vocab] logits,
    several copies under autograd). `defer_grad_sync`: gradients stay unsharded (bf16) until the last micro-batch.
    """
    est = Estimate("trainer")
    P, T = shape.params, gpus
    put = lambda name, nbytes, offload: (est.host if offload else est.gpu).__setitem__(name, nbytes / GB)
    if lora_rank:
        A = shape.lora_params(lora_rank)
        put("base weights (bf16, frozen)", 2 * P / T, param_offload)
        put("adapters + grads", 8 * A / T, param_offload)
        put("AdamW states (adapters)", 8 * A / T, optimizer_offload)
    else:
        put("parameters (fp32 shards)", 4 * P / T, param_offload)
        put("gradients (fp32 shards)", 4 * P / T, param_offload)
        put("AdamW states (fp32)", 8 * P / T, optimizer_offload)
    # gathered bf16 blocks (current + prefetched) and their bf16 gradients before the reduce-scatter
    est.gpu["gathered blocks (bf16)"] = (2 * 2 * shape.block_params + 2 * shape.block_params) / GB
    est.gpu["root: embeddings + LM head (bf16)"] = 2 * shape.embed_params / GB
    tokens, H = tokens_per_micro_batch, shape.hidden
    q_width = shape.heads * shape.head_dim  # H except where config.json sets head_dim (Qwen3)
    per_block = tokens * 2 * (3 * H + q_width + 2 * shape.kv_heads * shape.head_dim + 4 * shape.intermediate)
    if activation_checkpointing:
        est.gpu["activations (checkpointed)"] = (shape.layers * tokens * H * 2 + per_block) / GB
    else:
        est.gpu["activations"] = shape.layers * per_block / GB
    if logprob == "torch":
        resp = tokens if response_tokens is None else response_tokens
        est.gpu["log-prob logits (torch, fp32)"] = TORCH_LOGIT_COPIES * resp * shape.vocab * 4 / GB
    else:
        est.gpu["log-prob kernel"] = LOGPROB_BUFFER_GB
    if defer_grad_sync:
        est.gpu["unsharded gradients (deferred sync)"] = 2 * (shape.lora_params(lora_rank) if lora_rank else P) / GB
    if reference and not lora_rank:
        put("reference (bf16 shards)", 2 * P / T, reference_offload)
    est.gpu["CUDA context"] = CUDA_CONTEXT_GB
    return est


def rollout_memory(shape: ModelShape, *, tp: int, card_gb: float, utilization: float, seq_len: int,
                   max_num_seqs: int, lora_rank: int = 0, lora_base_copy: int = 0) -> tuple[Estimate, int]:
    """Memory of one GPU of an engine with tensor parallelism `tp`, and how many full sequences its KV cache holds.

    Like vLLM, the engine takes `utilization` of the card; what the weights and overheads leave is KV cache, up to
    what `max_num_seqs` sequences of `seq_len` tokens need. The native engine of a LoRA run holds float32 adapters
    (`lora_rank`) and a bf16 copy of the adapted base weights (`lora_base_copy` elements) to merge them into.
    """
    est = Estimate("rollout")
    est.gpu["weights (bf16)"] = 2 * shape.params / tp / GB
    if lora_rank:
        est.gpu["LoRA adapters + base copy"] = (4 * shape.lora_params(lora_rank) + 2 * lora_base_copy) / tp / GB
    est.gpu["activations + CUDA graphs"] = ENGINE_OVERHEAD_GB
    est.gpu["CUDA context"] = CUDA_CONTEXT_GB
    per_seq = seq_len * shape.kv_bytes_per_token() / tp / GB
    room = card_gb * utilization - est.gpu_total
    seqs = max(0, min(max_num_seqs, int(room / per_seq)))
    est.gpu["KV cache"] = seqs * per_seq
    return est, seqs


def format_estimates(estimates: list[Estimate], card_gb: float, card: str) -> str:
    """A table: one column per role, GB per GPU by component, the total against the card."""
    names = []
    for e in estimates:
        names += [n for n in e.gpu if n not in names]
    width = max(len(n) for n in names + ["host memory per GPU (offload)"]) + 2
    head = "".join(f"{e.role:>12}" for e in estimates)
    lines = [f"  {'GB per GPU':<{width}}{head}"]
    for n in names:
        cells = "".join(f"{e.gpu[n]:>12.1f}" if n in e.gpu else f"{'-':>12}" for e in estimates)
        lines.append(f"  {n:<{width}}{cells}")
    lines.append(f"  {'total on GPU':<{width}}" + "".join(f"{e.gpu_total:>12.1f}" for e in estimates)
                 + f"   of {card_gb:.0f} GB ({card})")
    if any(e.host for e in estimates):
        lines.append(f"  {'host memory per GPU (offload)':<{width}}"
                     + "".join(f"{e.host_total:>12.1f}" if e.host else f"{'-':>12}" for e in estimates))
    return "\n".join(lines)
