"""Export the trained policy as a Hugging Face folder that `AutoModelForCausalLM.from_pretrained` loads.

Every trainer rank calls the export (it is a collective over the FSDP mesh): the parameters are gathered one at a
time with `full_tensor()` in the same order on every rank, and the first rank of the mesh moves each to the host and
streams it into safetensors shards of at most `max_shard_bytes` (plus `model.safetensors.index.json` when there is
more than one). No rank ever holds more than one full tensor on the GPU and one shard on the host.

LoRA: `export_hf(..., merge_lora=True)` writes the merged weights W + (alpha/r) B A (a plain model, what an engine
without LoRA support loads); `export_adapter` writes a peft adapter folder (adapter_model.safetensors +
adapter_config.json) for `PeftModel.from_pretrained(base, folder)` or vLLM's LoRA loader.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from grpo.policy import (ADAPTER, CausalLMPolicy, adapter_named_parameters, gather_full, hf_name, is_adapter,
                         lora_merge, sharded_named_parameters)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja")


def iter_full_state(policy: CausalLMPolicy, *, merge_lora: bool = True, dtype: torch.dtype | None = None
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, full tensor) for every base-model parameter, in module order; a collective on every
    rank of the mesh (each rank must consume the whole iterator). With LoRA and `merge_lora`, adapted weights come
    merged (computed in float32, returned in the weight's dtype); without `merge_lora`, the base weights as loaded.
    The tensors are on the compute device; `dtype` casts them (None: the stored dtype)."""
    params = dict(sharded_named_parameters(policy))
    for name, p in params.items():
        if is_adapter(name):
            continue
        full = gather_full(p)
        if merge_lora and policy.lora is not None and name.endswith(".base_layer.weight"):
            module = name.removesuffix(".base_layer.weight")
            a = gather_full(params[f"{module}.lora_A.{ADAPTER}.weight"]).to(full.device)
            b = gather_full(params[f"{module}.lora_B.{ADAPTER}.weight"]).to(full.device)
            full = lora_merge(full, b, a, policy.lora.scaling).to(full.dtype)
        yield hf_name(name), (full if dtype is None else full.to(dtype))


def _writer_and_group(policy: CausalLMPolicy):
    """(does this rank write, the mesh's process group or None when unsharded)."""
    for _, p in sharded_named_parameters(policy):
        if isinstance(p, DTensor):
            mesh = p.device_mesh
            return mesh.get_local_rank() == 0, mesh.get_group()
    return True, None


def _clear(out: Path, patterns: tuple[str, ...]) -> None:
    for pattern in patterns:
        for file in out.glob(pattern):
            file.unlink()


def export_hf(policy: CausalLMPolicy, out_dir: str | Path, *, merge_lora: bool = True,
              dtype: torch.dtype | None = None, max_shard_bytes: int = 5 * 10**9,
              tokenizer_from: str | Path | None = None) -> Path:
    """Write `policy` as a Hugging Face model folder (config.json, safetensors shards, index). Collective over the
    mesh; the first mesh rank writes. `dtype` (e.g. torch.bfloat16) casts the weights, None keeps the stored dtype;
    `tokenizer_from` copies the tokenizer files of that folder. Returns the folder."""
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes={max_shard_bytes}: must be > 0")
    out = Path(out_dir).expanduser()
    writer, group = _writer_and_group(policy)
    if writer:
        out.mkdir(parents=True, exist_ok=True)
        _clear(out, ("model*.safetensors", "model*.safetensors.part", "model.safetensors.index.json"))
    parts: list[tuple[Path, list[str]]] = []
    current: dict[str, torch.Tensor] = {}
    used = total = 0

    def flush():
        nonlocal current, used
        part = out / f"model-{len(parts) + 1:05d}.safetensors.part"
        save_tensors(current, part)
        parts.append((part, list(current)))
        current, used = {}, 0

    for name, full in iter_full_state(policy, merge_lora=merge_lora, dtype=dtype):
        if not writer:
            continue
        nbytes = full.numel() * full.element_size()
        if current and used + nbytes > max_shard_bytes:
            flush()
        current[name] = full.to("cpu")
        used += nbytes
        total += nbytes
    if writer:
        if current or not parts:
            flush()
        if len(parts) == 1:
            parts[0][0].rename(out / "model.safetensors")
        else:
            weight_map = {}
            for i, (part, names) in enumerate(parts, start=1):
                final = f"model-{i:05d}-of-{len(parts):05d}.safetensors"
                part.rename(out / final)
                weight_map.update({n: final for n in names})
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        write_config(policy, out, dtype)
        if tokenizer_from is not None:
            copy_tokenizer(Path(tokenizer_from).expanduser(), out)
    if group is not None:
        dist.barrier(group=group)
    return out


def export_adapter(policy: CausalLMPolicy, out_dir: str | Path, *, base_model: str = "",
                   dtype: torch.dtype | None = None) -> Path:
    """Write the LoRA adapters as a peft folder (adapter_model.safetensors + adapter_config.json). Collective over
    the mesh; the first mesh rank writes. `base_model` goes into the config's base_model_name_or_path."""
    from peft import LoraConfig

    if policy.lora is None:
        raise ValueError("export_adapter: the policy has no LoRA adapters (model.lora_rank is 0); use export_hf")
    out = Path(out_dir).expanduser()
    writer, group = _writer_and_group(policy)
    tensors = {}
    for name, p in adapter_named_parameters(policy):
        full = gather_full(p)
        if writer:
            tensors[name] = (full if dtype is None else full.to(dtype)).to("cpu")
    if writer:
        out.mkdir(parents=True, exist_ok=True)
        save_tensors(tensors, out / "adapter_model.safetensors")
        spec = policy.lora
        LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=sorted(spec.targets), lora_dropout=0.0,
                   bias="none", task_type="CAUSAL_LM", base_model_name_or_path=base_model or None
                   ).save_pretrained(str(out))
    if group is not None:
        dist.barrier(group=group)
    return out


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


def write_config(policy: CausalLMPolicy, out: Path, dtype: torch.dtype | None) -> None:
    """config.json (with the dtype of the written weights) and generation_config.json."""
    lm = policy.lm
    lm.config.save_pretrained(str(out))
    if dtype is None:
        dtype = next(p.dtype for n, p in sharded_named_parameters(policy) if not is_adapter(n))
    cfg_file = out / "config.json"
    data = json.loads(cfg_file.read_text())
    key = "torch_dtype" if "torch_dtype" in data and "dtype" not in data else "dtype"
    data[key] = str(dtype).removeprefix("torch.")
    cfg_file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    gen = getattr(lm, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(str(out))


def copy_tokenizer(source: Path, out: Path) -> None:
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)
