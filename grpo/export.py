"""Export the trained policy as a Hugging Face folder that `AutoModelForCausalLM.from_pretrained` loads.

From a run folder, one process, while or after training (the job is not needed):

    python -m grpo.export RUN_DIR [--step N] [--adapter] [--out DIR] [--dtype float32|bfloat16]

reads the checkpoint `RUN_DIR/checkpoints/step_N` (default: the latest complete one) and writes a Hugging Face
folder (LoRA merged) with the tokenizer, or with `--adapter` the peft adapter folder of a LoRA run, to
`--out` (default `RUN_DIR/export/step_N` or `.../step_N-adapter`).

Every trainer rank calls the export (it is a collective over the FSDP mesh): the parameters are gathered one at a
time with `full_tensor()` in the same order on every rank, and the first rank of the mesh moves each to the host and
streams it into safetensors shards of at most `max_shard_bytes` (plus `model.safetensors.index.json` when there is
more than one). No rank ever holds more than one full tensor on the GPU and one shard on the host.

LoRA: `export_hf(..., merge_lora=True)` writes the merged weights W + (alpha/r) B A (a plain model, what an engine
without LoRA support loads); `export_adapter` writes a peft adapter folder (adapter_model.safetensors +
adapter_config.json) for `PeftModel.from_pretrained(base, folder)` or vLLM's LoRA loader.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
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


# ------------------------------------------------------------------------------------------- from a run folder

def resolve_checkpoint(run_dir: str | Path, step: int | None) -> tuple[dict, Path, int]:
    """(the run's config dict, the checkpoint folder, its step) for `step` (None: the latest complete one); a
    one-line ValueError when the run folder, its config or the checkpoint is missing."""
    from grpo import checkpoint

    run = Path(run_dir).expanduser()
    config_file = run / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{run} is not a run folder (no config.json)")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {config_file}: {str(e).splitlines()[0]}") from None
    found = {int(p.name.removeprefix("step_")): p for p in checkpoint.complete(run)}
    if not found:
        raise ValueError(f"{run} has no complete checkpoint yet (checkpoints/step_N; train.checkpoint_every sets "
                         f"how often a run writes one)")
    if step is None:
        step = max(found)
    if step not in found:
        raise ValueError(f"{run} has no checkpoint of step {step}; it has step(s) {', '.join(map(str, sorted(found)))}")
    return config, found[step], step


def load_policy_from_checkpoint(cfg, path: Path) -> CausalLMPolicy:
    """An unsharded policy (CPU) with the model state of a DCP checkpoint written by any number of trainer ranks:
    DCP reshards on load, and only the model entries are read (not the optimizer's)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    from grpo.policy import build_policy

    policy = build_policy(cfg.model, None, seed=cfg.train.seed, trainable=True, device=torch.device("cpu"))
    state = {"model": get_model_state_dict(policy)}
    dcp.load(state, checkpoint_id=str(path), no_dist=True)  # this process alone, no process group
    set_model_state_dict(policy, state["model"])
    return policy


def export_run(run_dir: str | Path, *, step: int | None = None, adapter: bool = False, out: str | Path | None = None,
               dtype: str | None = None) -> Path:
    """Export one checkpoint of a run folder (see the module docstring); returns the folder written."""
    from grpo.config import from_dict

    config, path, step = resolve_checkpoint(run_dir, step)
    cfg = from_dict(config)
    if adapter and cfg.model.lora_rank <= 0:
        raise ValueError(f"--adapter: {run_dir} is a full fine-tuning run (model.lora_rank=0), it has no adapter; "
                         f"export it without --adapter")
    if dtype not in (None, "float32", "bfloat16"):
        raise ValueError(f"--dtype {dtype!r}: use float32 or bfloat16")
    target = Path(out) if out else Path(run_dir) / "export" / (f"step_{step}-adapter" if adapter else f"step_{step}")
    policy = load_policy_from_checkpoint(cfg, path)
    if adapter:  # adapters stay in their float32 training dtype unless --dtype says otherwise
        target = export_adapter(policy, target, base_model="" if cfg.model.path == "tiny" else cfg.model.path,
                                dtype=getattr(torch, dtype) if dtype else None)
    else:  # as the loop's own export at the end of a run: the compute dtype
        target = export_hf(policy, target, dtype=getattr(torch, dtype or cfg.model.dtype))
    write_tokenizer(cfg.model.path, target)
    return target


def write_tokenizer(model_path: str, out: str | Path) -> None:
    """The run's tokenizer beside a model exported to `out` (after its config.json), as AutoTokenizer will read it:
    the tokenizer files of `model_path` copied as they are (a re-save through transformers can change the class
    they load as), or the tiny word-level tokenizer (`grpo.tiny.save_tokenizer` says why it needs care)."""
    if model_path == "tiny":
        from grpo.tiny import build_tokenizer, save_tokenizer

        save_tokenizer(build_tokenizer(), out)
    else:
        copy_tokenizer(Path(model_path).expanduser(), Path(out))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m grpo.export", description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", help="a run folder (holds config.json and checkpoints/step_N)")
    ap.add_argument("--step", type=int, default=None, help="the checkpoint's step (default: the latest)")
    ap.add_argument("--adapter", action="store_true", help="LoRA runs: write the peft adapter folder, not merged")
    ap.add_argument("--out", default=None, help="output folder (default: RUN_DIR/export/step_N[-adapter])")
    ap.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: the run's model.dtype)")
    args = ap.parse_args(argv)
    try:
        target = export_run(args.run_dir, step=args.step, adapter=args.adapter, out=args.out, dtype=args.dtype)
    except (ValueError, OSError) as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    print(f"exported {'adapter' if args.adapter else 'model'} to {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
