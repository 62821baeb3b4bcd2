"""The policy: a Hugging Face causal LM whose forward returns per-token log-probs (and entropy), sharded by FSDP2.

The forward never builds [tokens, vocab] logits in the loop: it takes the final hidden states of the response
positions and the LM head's weight and hands them to the log-prob kernel.

A model comes either from `grpo.tiny` (`model.path == "tiny"`) or from a local Hugging Face folder (config.json +
safetensors) of a family in `grpo.families` (Llama 3.x, Qwen2/2.5, Qwen3, Mistral). A checkpoint is never loaded whole: the model is built on the meta device, sharded by
FSDP2 (`fully_shard` per transformer block, then the root), materialised with `to_empty`, and every rank reads only
its own rows of each tensor from the safetensors files (`safe_open(...).get_slice`). Nothing here runs a collective,
so rollout ranks outside the FSDP mesh can never be caught in one.

LoRA (peft) is injected in place, so the module names stay the Hugging Face ones plus `.base_layer` / `.lora_A.*`.
The reference policy of a LoRA run is the same model with its adapters disabled (no second copy).
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Iterable, Iterator

import torch
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

import grpo_kernels
from grpo import packing as grpo_packing
from grpo_kernels import fused_logprob_ref
from grpo.config import ModelConfig
from grpo.families import BLOCKS, LORA_TARGETS, family_of
from grpo.tiny import build_tiny_model
from grpo.weight_sync import Computed

PREFIX = "lm."
ALL_LINEAR = LORA_TARGETS  # every family's seven block linears (grpo.families)
ADAPTER = "default"  # peft's adapter name; it appears in module names but not in saved adapter files
PEFT_PREFIX = "base_model.model."  # the prefix of every tensor name in a peft adapter file


@dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: int
    targets: tuple[str, ...]

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class CausalLMPolicy(nn.Module):
    """Wraps `lm` so that the FSDP2 root owns the embeddings, the final norm and the LM head."""

    def __init__(self, lm: nn.Module, *, lora: LoraSpec | None = None):
        super().__init__()
        self.lm = lm
        self.lora = lora
        self.kernel = "auto"  # "triton": grpo_kernels.fused_logprob; "torch": the reference; "auto": Triton where it runs

    def fused_loss_available(self, device) -> bool:
        return self.kernel == "triton" or (self.kernel == "auto" and grpo_kernels.triton_available(device))

    def logprob_fn(self, device):
        """The log-prob kernel for tensors on `device`: the fused Triton kernel (no [tokens, vocab] logits) where it
        can run, else the torch reference. The torch reference is the portable fallback on the CPU."""
        if self.kernel == "torch" or (self.kernel == "auto" and not grpo_kernels.triton_available(device)):
            return fused_logprob_ref
        return grpo_kernels.fused_logprob

    def forward(self, input_ids, attention_mask, loss_mask, *, temperature: float = 1.0, grpo: dict | None = None,
                pack: bool = False):
        """Log-prob and entropy of each target token, as [B, L-1] tensors (0 where `loss_mask` is 0).

        Position t predicts token t+1; `loss_mask` is [B, L-1] and selects the response tokens.
        With `grpo` (the keyword arguments of grpo_kernels.fused_grpo_loss, per-token tensors as [B, L-1]), returns
        instead that fused loss and its stats: the loss and its gradients in one pass over the LM head. It runs
        inside forward so that FSDP2 has gathered the LM head.
        With `pack` the right-padded rows run as one packed row of their real tokens (grpo.packing); inputs and
        outputs keep the padded layout, so callers see the same tensors either way.
        """
        sel = loss_mask.bool()
        hidden = (grpo_packing.packed_hidden if pack else grpo_packing.padded_hidden)(
            self.lm, input_ids, attention_mask, sel)
        targets = input_ids[:, 1:][sel]
        if grpo is not None:
            per_token = {k: v[sel] if torch.is_tensor(v) and v.dim() == 2 else v for k, v in grpo.items()}
            return grpo_kernels.fused_grpo_loss(hidden, self.lm.lm_head.weight, targets,
                                                temperature=temperature, mask=torch.ones_like(per_token["advantages"]),
                                                **per_token)
        logp, entropy = self.logprob_fn(hidden.device)(
            hidden, self.lm.lm_head.weight, targets, temperature=temperature, return_entropy=True,
        )
        logp_BT = torch.zeros(sel.shape, dtype=torch.float32, device=hidden.device).masked_scatter(sel, logp)
        ent_BT = torch.zeros(sel.shape, dtype=torch.float32, device=hidden.device).masked_scatter(sel, entropy)
        return logp_BT, ent_BT

    @contextlib.contextmanager
    def adapters_disabled(self):
        """Inside the block the policy computes as its base model (the LoRA reference). A no-op without LoRA."""
        layers = lora_layers(self)
        flags = [(p, p.requires_grad) for layer in layers for p in layer.parameters()]
        # peft's switch also clears requires_grad; FSDP2 reads requires_grad at its lazy init (first forward) to pick
        # the gradient dtypes, so the flags are put back at once: only the forward switch `_disable_adapters` changes.
        for layer in layers:
            layer.enable_adapters(False)
        for p, flag in flags:
            p.requires_grad_(flag)
        try:
            yield self
        finally:
            for layer in layers:
                layer.enable_adapters(True)
            for p, flag in flags:
                p.requires_grad_(flag)


class AdaptersOff:
    """The reference policy of a LoRA run: calls the policy with its adapters disabled. Same call signature."""

    def __init__(self, policy: CausalLMPolicy):
        self.policy = policy

    def __call__(self, *args, **kwargs):
        with self.policy.adapters_disabled():
            return self.policy(*args, **kwargs)


# ---------------------------------------------------------------------------------------------- checkpoint folders

@dataclass(frozen=True)
class Checkpoint:
    folder: Path
    config: dict
    files: dict[str, Path]  # tensor name -> safetensors file holding it


def read_checkpoint(path: str) -> Checkpoint:
    """Check a Hugging Face folder and index its tensors (headers only). One-line ValueError when it won't do."""
    from safetensors import safe_open

    where = f"model.path={path!r}"
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ValueError(f"{where}: no such folder; give a local Hugging Face checkpoint folder "
                         f"(config.json + *.safetensors) or 'tiny'")
    cfg_file = folder / "config.json"
    try:
        config = json.loads(cfg_file.read_text())
    except FileNotFoundError:
        raise ValueError(f"{where}: no config.json in {folder}; is this a Hugging Face model folder?") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{where}: cannot read {cfg_file}: {str(e).splitlines()[0]}") from None
    family_of(config, where=where)
    index = folder / "model.safetensors.index.json"
    files: dict[str, Path] = {}
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{where}: cannot read {index.name}: {e!r}") from None
        for name, file in weight_map.items():
            files[name] = folder / file
        for file in sorted(set(files.values())):
            if not file.is_file():
                raise ValueError(f"{where}: {index.name} names {file.name}, which is missing from {folder}")
    else:
        shards = sorted(folder.glob("*.safetensors"))
        if not shards:
            raise ValueError(f"{where}: no *.safetensors files in {folder} (re-save .bin checkpoints with "
                             f"save_pretrained(safe_serialization=True))")
        for file in shards:
            try:
                with safe_open(str(file), framework="pt") as f:
                    files.update({name: file for name in f.keys()})
            except Exception as e:  # safetensors raises its own error types for a corrupt header
                raise ValueError(f"{where}: cannot read {file.name}: {str(e).splitlines()[0]}") from None
    return Checkpoint(folder, config, files)


def meta_lm(ckpt: Checkpoint) -> nn.Module:
    """The model of `ckpt` on the meta device (no memory), float32, SDPA attention."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(ckpt.folder))
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return lm.float()


# ------------------------------------------------------------------------------------------------------- sharding

def shard_rows(p: torch.Tensor) -> tuple[int, int]:
    """The rows [start, stop) of the full tensor that this rank holds (all rows for a plain tensor)."""
    if not isinstance(p, DTensor):
        return 0, p.shape[0] if p.dim() else 0
    assert p.device_mesh.ndim == 1 and len(p.placements) == 1 and p.placements[0].is_shard(0), p.placements
    rows, world, rank = p.shape[0], p.device_mesh.size(), p.device_mesh.get_local_rank()
    chunk = -(-rows // world)  # FSDP2 shards like torch.chunk: ceil-sized pieces, the last ones short or empty
    start = min(rank * chunk, rows)
    stop = min(start + chunk, rows)
    assert p.to_local().shape[0] == stop - start, (p.to_local().shape, start, stop)
    return start, stop


def local_of(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if isinstance(p, DTensor) else p


@torch.no_grad()
def copy_rows(p: torch.Tensor, full: torch.Tensor) -> None:
    """Copy this rank's rows of the full tensor `full` into `p` (a DTensor shard or a plain tensor)."""
    start, stop = shard_rows(p)
    if p.dim() == 0 or stop > start:
        local_of(p).copy_(full[start:stop] if p.dim() else full)


def gather_full(p: torch.Tensor) -> torch.Tensor:
    """The full tensor of a parameter: a collective over its mesh for a DTensor. Works for CPU-offloaded shards
    on a CUDA mesh (the shard goes to the GPU first, as an NCCL group cannot gather host tensors)."""
    if not isinstance(p, DTensor):
        return p.detach()
    local = p.to_local().detach()
    if local.device.type != p.device_mesh.device_type:
        local = local.to(p.device_mesh.device_type)
        p = DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())
    return p.detach().full_tensor()


def hf_name(name: str) -> str:
    """The checkpoint name of a policy parameter: `lm.` and peft's `.base_layer` removed."""
    return name.removeprefix(PREFIX).replace(".base_layer.", ".")


def is_adapter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


@torch.no_grad()
def load_checkpoint_rows(named: Iterable[tuple[str, torch.Tensor]], ckpt: Checkpoint, *, where: str) -> None:
    """Fill each (checkpoint name, parameter) from `ckpt`, reading only this rank's rows of each tensor."""
    from safetensors import safe_open

    named = list(named)
    missing = [name for name, _ in named if name not in ckpt.files]
    if missing:
        raise ValueError(f"{where}: the checkpoint lacks {len(missing)} tensor(s) the model needs, "
                         f"e.g. {', '.join(missing[:3])}")
    by_file: dict[Path, list[tuple[str, torch.Tensor]]] = {}
    for name, p in named:
        by_file.setdefault(ckpt.files[name], []).append((name, p))
    for file, items in by_file.items():
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name, p in items:
                piece = f.get_slice(name)
                shape = tuple(piece.get_shape())
                if shape != tuple(p.shape):
                    raise ValueError(f"{where}: tensor {name} is {list(shape)} in {file.name}, "
                                     f"the model expects {list(p.shape)}")
                start, stop = shard_rows(p)
                if p.dim() == 0:
                    local_of(p).copy_(piece[...])
                elif stop > start:
                    local_of(p).copy_(piece[start:stop])


def materialise(module: nn.Module, lm: nn.Module, device: torch.device) -> None:
    """`to_empty` on `device` (garbage values, to be loaded). Module._apply gives a tied LM head its own tensor
    (FSDP2's does not), so the tie is put back."""
    module.to_empty(device=device)
    if getattr(lm.config, "tie_word_embeddings", False):
        out, emb = lm.get_output_embeddings(), lm.get_input_embeddings()
        if out.weight is not emb.weight:
            out.weight = emb.weight


def reinit_buffers(lm: nn.Module, device: torch.device) -> None:
    """Recompute the non-persistent buffers that `to_empty` left as garbage (rotary `inv_freq`), on `device`."""
    for module in lm.modules():
        if not type(module).__name__.endswith("RotaryEmbedding"):
            assert not module._buffers, f"buffers of {type(module).__name__} are not initialised"
            continue
        fresh = type(module)(config=module.config)
        for name, buf in fresh.named_buffers(recurse=False):
            persistent = name not in module._non_persistent_buffers_set
            module.register_buffer(name, buf.to(device), persistent=persistent)
        if hasattr(fresh, "attention_scaling"):
            module.attention_scaling = fresh.attention_scaling


# ----------------------------------------------------------------------------------------------------------- LoRA

def lora_spec(cfg: ModelConfig) -> LoraSpec | None:
    if cfg.lora_rank <= 0:
        return None
    if cfg.lora_alpha <= 0:
        raise ValueError(f"model.lora_alpha={cfg.lora_alpha}: must be > 0")
    if cfg.lora_targets.strip() == "all-linear":
        targets = ALL_LINEAR
    else:
        targets = tuple(t.strip() for t in cfg.lora_targets.split(",") if t.strip())
        unknown = [t for t in targets if t not in ALL_LINEAR]
        if unknown or not targets:
            raise ValueError(f"model.lora_targets={cfg.lora_targets!r}: use 'all-linear' or a comma-separated "
                             f"subset of {', '.join(ALL_LINEAR)}")
    return LoraSpec(cfg.lora_rank, cfg.lora_alpha, targets)


def inject_lora(lm: nn.Module, spec: LoraSpec) -> None:
    """Add LoRA adapters (float32) in place; only they require grad. Values come from `init_adapters`."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=list(spec.targets), lora_dropout=0.0,
                        bias="none")
    inject_adapter_in_model(config, lm, adapter_name=ADAPTER)
    for name, p in lm.named_parameters():
        p.requires_grad_(is_adapter(name))
    for module in lora_layers(lm):
        module.lora_A.float()
        module.lora_B.float()


def lora_layers(module: nn.Module) -> list[nn.Module]:
    from peft.tuners.lora import LoraLayer

    return [m for m in module.modules() if isinstance(m, LoraLayer)]


@torch.no_grad()
def init_adapters(module: nn.Module, seed: int) -> None:
    """peft's init (A ~ kaiming-uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), B = 0) from a seeded CPU generator.

    Every rank draws every full A in the same order and keeps its rows, so the adapters do not depend on the number
    of ranks, and no DTensor random op (which would broadcast a seed over the default group) runs.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if ".lora_A." in name:
            bound = 1.0 / math.sqrt(p.shape[1])
            copy_rows(p, torch.empty(p.shape, dtype=torch.float32).uniform_(-bound, bound, generator=gen))
        elif ".lora_B." in name:
            local_of(p).zero_()


def peft_name(name: str) -> str:
    """Policy name of an adapter tensor -> its name in a peft adapter file (what vLLM's LoRA loader reads)."""
    return PEFT_PREFIX + name.removeprefix(PREFIX).replace(f".{ADAPTER}.", ".")


@torch.no_grad()
def load_adapter_weights(lm: nn.Module, weights: Iterable[tuple[str, torch.Tensor]]) -> int:
    """Receiver side of an adapter-only sync: copy (peft-file name, tensor) pairs into a model from `build_lm`
    (which carries the same adapters). Returns how many were loaded."""
    params = dict(lm.named_parameters())
    count = 0
    for name, tensor in weights:
        if not name.startswith(PEFT_PREFIX) or not is_adapter(name):
            raise KeyError(f"{name!r} is not an adapter tensor name")
        target = name.removeprefix(PEFT_PREFIX).replace(".weight", f".{ADAPTER}.weight")
        if target not in params:
            raise KeyError(f"model has no adapter parameter {target!r}")
        params[target].copy_(tensor)
        count += 1
    return count


class MergedAdapters:
    """The native engine's side of a LoRA run: adapters arrive (`load_adapter_weights`), and generation runs on
    W0 + (alpha/r) B A merged into each adapted linear, through peft's merged path (the base layer alone), instead of
    the two extra small matmuls per linear of peft's unmerged forward (about 2x the decode time measured at 1.5B).
    The merge starts from a kept copy of the loaded base W0 each time, so no rounding accumulates over syncs; the
    copy costs the adapted weights' bytes once more (the native engine serves small models; vLLM merges on the
    trainers instead)."""

    def __init__(self, lm: nn.Module):
        self.lm = lm
        self.layers = lora_layers(lm)
        self.base = [m.base_layer.weight.detach().clone() for m in self.layers]

    @torch.no_grad()
    def load(self, weights: Iterable[tuple[str, torch.Tensor]]) -> int:
        count = load_adapter_weights(self.lm, weights)
        for module, w0 in zip(self.layers, self.base):
            a, b = module.lora_A[ADAPTER].weight, module.lora_B[ADAPTER].weight
            weight = module.base_layer.weight
            weight.copy_(lora_merge(w0, b, a, module.scaling[ADAPTER]))
            module.merged_adapters = [ADAPTER]  # peft's forward now calls the base layer alone
        return count


# ------------------------------------------------------------------------------------------------------- building

def build_lm(cfg: ModelConfig, seed: int, *, device: torch.device | str = "cpu") -> nn.Module:
    """An unsharded model for a rollout rank's native engine, in `cfg.dtype` (adapters float32 with LoRA, so that
    `load_adapter_weights` fits). Loads a checkpoint folder one tensor at a time; no collective."""
    spec = lora_spec(cfg)
    dtype = getattr(torch, cfg.dtype)
    if cfg.path == "tiny":
        lm = build_tiny_model(seed).to(dtype)
        if spec:
            inject_lora(lm, spec)
    else:
        ckpt = read_checkpoint(cfg.path)
        lm = meta_lm(ckpt).to(dtype)
        if spec:
            inject_lora(lm, spec)
        materialise(lm, lm, torch.device(device))
        named = [(hf_name(n), p) for n, p in lm.named_parameters() if not is_adapter(n)]
        load_checkpoint_rows(named, ckpt, where=f"model.path={cfg.path!r}")
        reinit_buffers(lm, torch.device(device))
    if spec:
        init_adapters(lm, seed)
    return lm.to(device)


def apply_checkpointing(policy: CausalLMPolicy) -> None:
    """Activation checkpointing per transformer block: only block inputs are kept, the rest is recomputed in the
    backward. The composable API keeps parameter names (a wrapper module would add `_checkpoint_wrapped_module.`)."""
    from torch.distributed._composable import checkpoint

    for block in policy.lm.get_submodule(BLOCKS):
        checkpoint(block)


def apply_fsdp(policy: CausalLMPolicy, mesh, *, param_dtype: torch.dtype, offload: bool = False) -> CausalLMPolicy:
    """FSDP2: one group per transformer block, then the root (embeddings, norm, LM head). `param_dtype` compute,
    float32 gradient reduction; `offload` keeps the shards, their gradients and so the optimizer step on the host
    (FSDP2 CPUOffloadPolicy)."""
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    extra = {"offload_policy": CPUOffloadPolicy(pin_memory=True)} if offload else {}
    for block in policy.lm.get_submodule(BLOCKS):  # every family keeps its blocks at model.layers
        fully_shard(block, mesh=mesh, mp_policy=mp, **extra)
    fully_shard(policy, mesh=mesh, mp_policy=mp, **extra)
    return policy


def build_policy(cfg: ModelConfig, mesh, *, seed: int, trainable: bool, device: torch.device) -> CausalLMPolicy:
    """The trainer's policy (trainable) or a frozen reference copy, sharded over `mesh` (None: unsharded).

    Storage: trainable weights float32 (the master copy); frozen ones (the reference, a LoRA base) in `cfg.dtype`;
    LoRA adapters float32. Compute in `cfg.dtype`. Collective-free until the first forward.
    """
    device = torch.device(device)
    spec = lora_spec(cfg) if trainable else None
    store = torch.float32 if trainable and not spec else getattr(torch, cfg.dtype)
    offload = cfg.param_offload and mesh is not None
    ckpt = None
    if cfg.path == "tiny":
        lm = build_tiny_model(seed).to(store)
    else:
        ckpt = read_checkpoint(cfg.path)
        lm = meta_lm(ckpt).to(store)
    if spec:
        inject_lora(lm, spec)
    policy = CausalLMPolicy(lm, lora=spec)
    if not trainable:
        policy.requires_grad_(False).eval()
    if ckpt is None:
        policy.to(device)
    if cfg.activation_checkpointing and trainable:
        apply_checkpointing(policy)
    if mesh is not None:
        apply_fsdp(policy, mesh, param_dtype=getattr(torch, cfg.dtype), offload=offload)
    if ckpt is not None:
        materialise(policy, lm, torch.device("cpu") if offload else device)
        named = [(hf_name(n), p) for n, p in policy.named_parameters() if not is_adapter(n)]
        load_checkpoint_rows(named, ckpt, where=f"model.path={cfg.path!r}")
        reinit_buffers(lm, device)
    if spec:
        init_adapters(policy, seed)
    return policy


def build_reference(cfg: ModelConfig, policy: CausalLMPolicy, mesh, *, seed: int, device: torch.device):
    """What the loop calls for reference log-probs, with the policy's call signature: for LoRA the policy with
    its adapters disabled (no second copy), else a frozen FSDP2 copy (offloaded with `cfg.param_offload`)."""
    if policy.lora is not None:
        return AdaptersOff(policy)
    return build_policy(cfg, mesh, seed=seed, trainable=False, device=device)


# ----------------------------------------------------------------------------------------------- names for the loop

def sharded_named_parameters(policy: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """`named_parameters()` with every FSDP2 group resharded first: after a forward without backward the root group
    stays unsharded (FSDP2 keeps it for the backward), and its modules then hold compute-dtype full tensors."""
    for module in policy.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
    return list(policy.named_parameters())


def hf_named_parameters(policy: CausalLMPolicy) -> list[tuple[str, torch.Tensor]]:
    """Base-model parameters under their Hugging Face checkpoint names, in module order (the same on every rank).
    Adapters are left out (see `adapter_named_parameters`); a tied LM head appears once, as the embedding."""
    return [(hf_name(name), p) for name, p in sharded_named_parameters(policy) if not is_adapter(name)]


def adapter_named_parameters(policy: CausalLMPolicy) -> list[tuple[str, torch.Tensor]]:
    """LoRA adapter parameters under their peft adapter-file names
    (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`), in module order."""
    return [(peft_name(name), p) for name, p in sharded_named_parameters(policy) if is_adapter(name)]


def sync_named_parameters(policy: CausalLMPolicy) -> list[tuple[str, torch.Tensor]]:
    """What the weight sync sends after each step: only the adapters with LoRA, else every parameter."""
    return adapter_named_parameters(policy) if policy.lora is not None else hf_named_parameters(policy)


def sync_named_tensors(policy: CausalLMPolicy, *, merge_lora: bool
                       ) -> tuple[list[tuple[str, torch.Tensor | Computed]], set[str]]:
    """What the weight sync sends, and the names of it that never change (the first sync sends those, later ones
    do not): every parameter with full fine-tuning; with LoRA the adapters (for an engine that carries them, the
    native one), or with `merge_lora` the merged weights (for vLLM: grpo.vllm_engine says why), of which only the
    adapted ones change."""
    if policy.lora is None or not merge_lora:
        return sync_named_parameters(policy), set()
    named = merged_named_tensors(policy)
    return named, {name for name, t in named if not isinstance(t, Computed)}


def merged_named_tensors(policy: CausalLMPolicy) -> list[tuple[str, torch.Tensor | Computed]]:
    """Every base-model parameter under its Hugging Face name, in module order, each LoRA-adapted weight as a
    `Computed` merge W + (alpha/r) B A with W's shape, dtype and sharding (made at send time by `merge_rows`)."""
    params = dict(sharded_named_parameters(policy))
    out = []
    for name, p in params.items():
        if is_adapter(name):
            continue
        if name.endswith(".base_layer.weight"):
            module = name.removesuffix(".base_layer.weight")
            a, b = params[f"{module}.lora_A.{ADAPTER}.weight"], params[f"{module}.lora_B.{ADAPTER}.weight"]
            p = Computed(p, partial(merge_rows, p, a, b, policy.lora.scaling))
        out.append((hf_name(name), p))
    return out


@torch.no_grad()
def lora_merge(w: torch.Tensor, b: torch.Tensor, a: torch.Tensor, scaling: float) -> torch.Tensor:
    """W + scaling * B @ A in float32 (the one merge formula: sync to vLLM, the native engine, export)."""
    return torch.addmm(w.float(), b.float(), a.float(), alpha=scaling)


def merge_rows(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """This rank's rows of W + scaling * B @ A (computed in float32, returned in W's dtype and sharding, on the mesh's
    device). W [out, in] and B [out, r] are row-sharded alike, so B's local rows give W's; A [r, in] is gathered
    whole: a collective over the mesh, so every rank merges the same layers in the same order."""
    a_full = gather_full(a).float()
    assert shard_rows(w) == shard_rows(b), (shard_rows(w), shard_rows(b))
    device = a_full.device  # the mesh's: offloaded host shards are merged on the GPU
    w_local = local_of(w).to(device, non_blocking=True).float()
    b_local = local_of(b).to(device, non_blocking=True).float()
    merged = lora_merge(w_local, b_local, a_full, scaling).to(w.dtype)
    if isinstance(w, DTensor):
        return DTensor.from_local(merged, w.device_mesh, w.placements, run_check=False, shape=w.shape,
                                  stride=w.stride())
    return merged


def trainable_parameters(policy: CausalLMPolicy) -> list[torch.Tensor]:
    """The parameters the optimizer owns: the adapters with LoRA, else all of them."""
    return [p for _, p in sharded_named_parameters(policy) if p.requires_grad]


# ------------------------------------------------------------------------------------------------------ optimizer

def build_optimizer(policy: CausalLMPolicy, cfg: ModelConfig, *, lr: float, weight_decay: float
                    ) -> torch.optim.AdamW:
    """AdamW over `trainable_parameters`. With `cfg.optimizer_offload` (and shards on the GPU) the AdamW state
    lives in pinned host memory between steps and visits the GPU only for `step()` (step hooks). With
    `cfg.param_offload` the shards, gradients and state are all on the host and the step runs there."""
    opt = torch.optim.AdamW(trainable_parameters(policy), lr=lr, weight_decay=weight_decay)
    if cfg.optimizer_offload and not cfg.param_offload:
        offload_optimizer_state(opt)
    return opt


def _state_tensors(opt: torch.optim.Optimizer) -> Iterator[tuple[dict, str, torch.Tensor]]:
    for state in opt.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                yield state, key, value


def _with_local(t: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """`t` with `local` as its local tensor, wherever `local` lives. (DTensor.from_local would move a host tensor
    back to the mesh's device; FSDP2 builds its host-resident shards with this same constructor.)"""
    if isinstance(t, DTensor):
        return DTensor(local, t._spec, requires_grad=False)
    return local


def offload_optimizer_state(opt: torch.optim.Optimizer) -> None:
    """Keep the optimizer state (e.g. AdamW's two moments) in pinned host memory between steps, on the GPU only
    inside `step()`. The host buffers are allocated once and reused."""
    hosts: dict[tuple[int, str], torch.Tensor] = {}
    homes: dict[tuple[int, str], torch.device] = {}

    def to_device(optimizer, args, kwargs):
        for state, key, t in _state_tensors(optimizer):
            device = homes.get((id(state), key))
            if device is not None and local_of(t).device.type == "cpu":
                state[key] = _with_local(t, local_of(t).to(device, non_blocking=True))

    def to_host(optimizer, args, kwargs):
        for state, key, t in _state_tensors(optimizer):
            local = local_of(t)
            if local.device.type == "cpu":
                continue
            slot = (id(state), key)
            host = hosts.get(slot)
            if host is None or host.shape != local.shape or host.dtype != local.dtype:
                host = hosts[slot] = torch.empty(local.shape, dtype=local.dtype, pin_memory=True)
            host.copy_(local, non_blocking=True)  # same stream: ordered after the last step's use of `host`
            state[key] = _with_local(t, host)
            homes[slot] = local.device
        if homes:
            torch.cuda.current_stream().synchronize()

    opt.register_step_pre_hook(to_device)
    opt.register_step_post_hook(to_host)
