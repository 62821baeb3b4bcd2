"""Hardware facts the planner and the ranks share: per-card specs and the measured or assumed efficiencies of the
step-time model (hpc.steptime). No torch: the login node imports this.

Every constant says where it comes from: "vendor" (the datasheet), "measured" (GPU_NOTES.md, with the section and
figure), "fitted" (chosen so the model reproduces measured figures; tests/unit/test_steptime.py checks them) or
"assumed" (no measurement yet; what would validate it is in the comment).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GpuSpec:
    memory_gb: float  # vendor: usable HBM
    hbm_gbps: float  # vendor: HBM bandwidth, GB/s
    bf16_tflops: float  # vendor: dense bf16 tensor-core peak (without sparsity)
    nvlink_gbps: float  # vendor: NVLink bandwidth per direction (half the bidirectional figure); 0 = PCIe only
    pcie_gbps: float  # vendor: host link per direction (PCIe Gen5 x16 64, Gen4 x16 32)


GPUS = {
    "h100": GpuSpec(memory_gb=80, hbm_gbps=3350, bf16_tflops=989, nvlink_gbps=450, pcie_gbps=64),  # SXM5
    "h800": GpuSpec(memory_gb=80, hbm_gbps=3350, bf16_tflops=989, nvlink_gbps=200, pcie_gbps=64),  # NVLink 400 bidir
    "h200": GpuSpec(memory_gb=141, hbm_gbps=4800, bf16_tflops=989, nvlink_gbps=450, pcie_gbps=64),
    "h20": GpuSpec(memory_gb=96, hbm_gbps=4000, bf16_tflops=148, nvlink_gbps=450, pcie_gbps=64),
    "a100": GpuSpec(memory_gb=80, hbm_gbps=2039, bf16_tflops=312, nvlink_gbps=300, pcie_gbps=32),
    "a800": GpuSpec(memory_gb=80, hbm_gbps=2039, bf16_tflops=312, nvlink_gbps=200, pcie_gbps=32),
    "l40s": GpuSpec(memory_gb=48, hbm_gbps=864, bf16_tflops=362, nvlink_gbps=0, pcie_gbps=32),
    "b200": GpuSpec(memory_gb=180, hbm_gbps=8000, bf16_tflops=2250, nvlink_gbps=900, pcie_gbps=64),
}

# ------------------------------------------------------------------------------------------- the efficiency table
# Generation (rollout engines)
DECODE_HBM_EFF = 0.82  # fitted: share of HBM bandwidth a decode step's weight + KV reads reach. From two native-
#   engine figures (GPU_NOTES "The whole loop on GPUs"): 64 x 512 tokens of Qwen2.5-1.5B in 1.52-1.62 s on an H200
#   (h100x1 call 3, h100x2 call 5) and 1.81 s on an H100 (LoRA merged, call 6): the card gap fixes bytes vs overhead.
DECODE_STEP_OVERHEAD_S = {"native": 1.7e-3,  # fitted with DECODE_HBM_EFF: launches, sampling, host work per step;
#                          1.9e-3 before the decode step fused q/k/v and gate/up (2.69 vs 3.06 ms a step at batch 64,
#                          grpo.bench.decode on an H200, GPU_NOTES "This session")
                          "vllm": 1.0e-3}  # assumed: CUDA graphs + V1's async scheduler; no vLLM figure at scale yet
DECODE_FLOPS_EFF = 0.5  # assumed: skinny decode matmuls (batch <= 512 rows) at half the bf16 peak; binds on H20
PREFILL_FLOPS_EFF = 0.5  # assumed: prompt prefill at half the bf16 peak (prompts are short: small share of a step)
TP_ALLREDUCE_S = 10e-6  # assumed: one small all-reduce inside a node (2 per layer per decode step at TP > 1)
# Training (FSDP2 trainer ranks)
TRAIN_FLOPS_EFF = 0.40  # fitted: MFU of forward/backward passes. The h100x1 loop on an H200 (GPU_NOTES, call 3):
#   reference pass + update with recompute over 64 x 640 tokens of Qwen2.5-1.5B in 1.55 s (1.61 s in call 5) is
#   0.39-0.41 of 989 TFLOP/s. The 70B estimate assumes the same 40%.
LORA_CALL_OVERHEAD_S = 0.35e-3  # fitted: per LoRA layer call per micro-batch per pass (peft's Python and small
#   kernels): h100x2 LoRA r=32 update 2.14 s vs full 1.61 s on an H200 (GPU_NOTES, call 5); 2.00 s on an H100 (call 6)
GPU_ADAMW_BYTES_PER_PARAM = 28  # fp32 param, grad, m, v read; param, m, v written
MEMORY_BOUND_EFF = 0.7  # assumed: share of HBM bandwidth of elementwise kernels (AdamW, copies)
HOST_ADAMW_PARAMS_PER_S = 53e6  # measured: parameters per second per rank of AdamW on the host (FSDP2
#   CPUOffloadPolicy): GPU_NOTES "GRPO update with offload", full-paramoff update 16.67 s vs full-optoff 1.52 s with
#   0.77 B parameters per rank (2 ranks): ~14.6 s of host AdamW per step
PCIE_EFF = 0.5  # assumed: share of the PCIe link a GPU gets when every GPU of a node copies at once (pinned memory)
# Links
SYNC_GBPS_NVLINK = 300.0  # measured: weight sync end to end over NVLink, H200 (GPU_NOTES "Weight sync and engines",
#   1 trainer, 64 MB-1 GB buckets: 296-333 GB/s; grpo.bench.sync). Scaled by nvlink_gbps / 450 for other cards.
SYNC_NVLINK_REF_GBPS = 450.0  # the H200's NVLink per direction, the card SYNC_GBPS_NVLINK was measured on
SYNC_GBPS_IPC = 190.0  # measured: CUDA-IPC sync on one GPU, h100x1 on an H200: 3.1 GB in 16 ms (GPU_NOTES, call 3)
NIC_GBPS = 50.0  # assumed: one 400 Gb/s InfiniBand NIC per GPU (not measured: no multi-node machine was lent)
SYNC_GBPS_NETWORK = NIC_GBPS  # a weight broadcast between nodes is bound by the sender's NIC
ENGINE_WAKE_S = {"native": 0.1,  # assumed: the native engine frees and re-allocates its static cache
                 "vllm": 2.0}  # assumed: vLLM sleep(level=2) + wake_up (weights and KV cache re-allocated)
# Rewards: one response's scoring in one process (dataset rewards run in a pool of them, grpo.scoring)
REWARD_MS = {"gsm8k": 0.012,  # measured on the CPU dev machine (grpo.rewards.gsm8k_reward, 1 KB response)
             "math": 7.0,  # measured on the CPU dev machine: 0.44 ms (a fraction) to 13 ms (a polynomial) through
             #   math-verify; 7 ms is the project's working figure for a MATH response
             "toy": 0.005}  # assumed: the toy tasks compare a few words
# the scoring pool's cost per response in the driver (pipe round trip), measured on the CPU dev machine: 5,120 GSM8K
# responses through 2 workers in 0.57 s (0.11 ms each, gsm8k's own 0.012 ms included)
REWARD_POOL_MS = 0.1


def gpu(name: str) -> GpuSpec:
    """The spec of a card by its Slurm GRES name; KeyError for an unknown card."""
    return GPUS[name]


def nvlink_sync_gbps(card: GpuSpec) -> float:
    """Expected end-to-end sync bandwidth inside a node: the H200 measurement scaled by the card's NVLink."""
    if card.nvlink_gbps == 0:
        return card.pcie_gbps * PCIE_EFF  # no NVLink: GPU to GPU through the host's PCIe switches
    return SYNC_GBPS_NVLINK * card.nvlink_gbps / SYNC_NVLINK_REF_GBPS
