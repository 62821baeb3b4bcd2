"""The policy from a sharded Hugging Face checkpoint, on real processes: 2 FSDP2 trainer ranks + 1 rollout rank
outside the mesh (gloo, float32).

Checked against independent references: the checkpoint files read whole with safetensors, and an unsharded
`AutoModelForCausalLM.from_pretrained` model (log-probs in float64). Also: LoRA (only adapters train, the base stays,
the reference is the base model), export round trips through transformers, and the adapter-only weight sync.
The bad-path errors are checked without processes.
"""

import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from grpo.config import ModelConfig
from grpo.export import export_hf
from grpo.policy import (AdaptersOff, adapter_named_parameters, build_lm, build_optimizer, build_policy,
                         build_reference, hf_named_parameters, load_adapter_weights, sharded_named_parameters,
                         sync_named_parameters, trainable_parameters)
from grpo.rollout import NativeEngine
from grpo.weight_sync import WeightReceiver, WeightSender

TRAINERS, ROLLOUT = [0, 1], 2
VOCAB = 23  # odd row counts (vocab, intermediate) give uneven shards: 12 + 11 rows, 23 + 22 rows


def save_checkpoint(folder, *, tied: bool) -> str:
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=40, intermediate_size=45, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=32,
                         tie_word_embeddings=tied)
    Qwen2ForCausalLM(config).save_pretrained(folder, safe_serialization=True, max_shard_size="30KB")
    assert len(list(folder.glob("*.safetensors"))) >= 3
    return str(folder)


def read_all(folder) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[2, :3] = 0  # left padding
    return ids, mask, (torch.arange(8) >= 3).float().expand(3, 8) * mask[:, 1:]


def token_logp(model, ids, mask):
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.double()
    return torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]


def assert_close(got, want, mask, what, tol=1e-5):
    diff = ((got.double() - want.double()) * mask).abs()
    bad = int((diff > tol).sum())
    assert bad == 0, f"{what}: {bad} of {int(mask.sum())} log-probs differ, max {diff.max():.2e}"


def expected_rows(full: torch.Tensor, rank: int) -> torch.Tensor:
    chunks = torch.chunk(full, len(TRAINERS), dim=0)
    return chunks[rank] if rank < len(chunks) else full[:0]


def trainer(rank, cfg, ckpt_dir, out_dir, train_pg, sync_pg, lora):
    mesh = DeviceMesh.from_group(train_pg, device_type="cpu")
    files = read_all(ckpt_dir)
    base = AutoModelForCausalLM.from_pretrained(str(ckpt_dir), dtype=torch.float32)
    ids, mask, loss_mask = batch()
    base_logp = token_logp(base, ids, mask)

    policy = build_policy(cfg, mesh, seed=0, trainable=True, device=torch.device("cpu"))
    reference = build_reference(cfg, policy, mesh, seed=0, device=torch.device("cpu"))
    assert isinstance(reference, AdaptersOff) == lora
    named = hf_named_parameters(policy)
    assert {n for n, _ in named} == set(files) - ({"lm_head.weight"} if cfg.path.endswith("tied") else set())
    for name, p in named:
        assert isinstance(p, DTensor)
        assert torch.equal(p.to_local(), expected_rows(files[name], rank)), f"{name}: local shard != checkpoint rows"

    with torch.no_grad():  # the reference goes first: with LoRA it is the policy's first forward (FSDP2 lazy init)
        ref_logp, _ = reference(ids, mask, loss_mask)
        logp, _ = policy(ids, mask, loss_mask)
    assert_close(ref_logp, base_logp, loss_mask, "reference vs unsharded transformers model")
    assert_close(logp, base_logp, loss_mask, "sharded policy vs unsharded transformers model")  # B = 0 at init

    params = trainable_parameters(policy)
    if lora:
        adapters = dict(adapter_named_parameters(policy))
        assert {id(p) for p in params} == {id(p) for p in adapters.values()} and len(params) == 2 * 7 * 2
        assert all(not p.requires_grad for _, p in named)
        assert all(n.startswith("base_model.model.model.layers.") and n.endswith(("lora_A.weight", "lora_B.weight"))
                   for n in adapters)
    else:
        assert len(params) == len(named)
    before = {id(p): p.to_local().clone() for _, p in sharded_named_parameters(policy)}
    opt = build_optimizer(policy, cfg, lr=1e-2, weight_decay=0.0)
    for _ in range(2):  # LoRA's A gets no gradient while B is still 0: the second step moves it
        logp, _ = policy(ids, mask, loss_mask)
        (-(logp * loss_mask).sum() / loss_mask.sum()).backward()
        norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        assert torch.isfinite(norm.full_tensor() if isinstance(norm, DTensor) else norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
    for name, p in sharded_named_parameters(policy):
        changed = not torch.equal(p.to_local(), before[id(p)])
        if p.to_local().numel():
            assert changed == p.requires_grad, f"{name}: changed={changed}, trainable={p.requires_grad}"
    for name, p in named:
        if lora:
            assert torch.equal(p.to_local(), expected_rows(files[name], rank)), f"{name}: base weight moved"

    with torch.no_grad():
        new_logp, _ = policy(ids, mask, loss_mask)
        ref_logp, _ = reference(ids, mask, loss_mask)
    assert_close(ref_logp, base_logp, loss_mask, "reference after a step vs the base model")
    assert ((new_logp - logp.detach()) * loss_mask).abs().max() > 1e-4, "the step did not change the policy"

    out = export_hf(policy, out_dir, max_shard_bytes=20_000)  # collective over the two trainer ranks
    if rank == 0:
        assert json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
        exported = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
        assert_close(new_logp, token_logp(exported, ids, mask), loss_mask, "exported folder vs trained policy")

    sender = WeightSender(sync_named_parameters(policy), sync_pg, src=0, bucket_bytes=4096)
    if lora:
        assert all("lora_" in s.name for s in sender.specs)
    box = [(sender.specs, new_logp) if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    sender.send()


def rollout(cfg, ckpt_dir, sync_pg, lora):
    lm = build_lm(cfg, seed=0)  # no collective: the trainers are busy loading and training meanwhile
    want = AutoModelForCausalLM.from_pretrained(str(ckpt_dir), dtype=torch.float32).state_dict()
    got = {k.replace(".base_layer.", "."): v for k, v in lm.state_dict().items() if "lora_" not in k}
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    box = [None]
    dist.broadcast_object_list(box, src=0)
    specs, new_logp = box[0]
    receiver = WeightReceiver(specs, sync_pg, src=0, bucket_bytes=4096, device=torch.device("cpu"))
    if lora:
        loaded = load_adapter_weights(lm, receiver.receive())
    else:
        loaded = NativeEngine(lm, pad_id=0, eos_id=1, max_new_tokens=2).load_weights(receiver.receive())
    assert loaded == len(specs)
    ids, mask, loss_mask = batch()
    assert_close(token_logp(lm, ids, mask), new_logp, loss_mask, "rollout model after the sync vs trained policy")


def worker(rank, init_file, ckpt_dir, out_dir, lora):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=3)
    train_pg = dist.new_group(TRAINERS)
    sync_pg = dist.new_group([TRAINERS[0], ROLLOUT])
    cfg = ModelConfig(path=str(ckpt_dir), lora_rank=4 if lora else 0, lora_alpha=8, lora_targets="all-linear")
    try:
        if rank in TRAINERS:
            trainer(rank, cfg, ckpt_dir, out_dir, train_pg, sync_pg, lora)
        else:
            rollout(cfg, ckpt_dir, sync_pg, lora)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("lora", [False, True], ids=["full-untied", "lora-tied"])
def test_sharded_load_train_export_and_sync(tmp_path, lora):
    ckpt = tmp_path / ("ckpt-tied" if lora else "ckpt")
    save_checkpoint(ckpt, tied=lora)
    mp.spawn(worker, args=(str(tmp_path / "init"), ckpt, tmp_path / "export", lora), nprocs=3, join=True)


# ------------------------------------------------------------------------------------------------ bad model paths

def one_line_error(path, match):
    with pytest.raises(ValueError, match=match) as info:
        build_lm(ModelConfig(path=str(path)), seed=0)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_missing_folder(tmp_path):
    one_line_error(tmp_path / "nope", "no such folder")


def test_folder_without_config(tmp_path):
    one_line_error(tmp_path, "no config.json")


def test_unreadable_config(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    one_line_error(tmp_path, "cannot read")


@pytest.mark.parametrize("model_type", ["gpt2", "qwen2_5"])  # qwen2_5 is no model type: Qwen2.5 says qwen2
def test_not_a_supported_family(tmp_path, model_type):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    one_line_error(tmp_path, f"model_type='{model_type}'.*llama.*qwen2.*qwen3.*mistral")


def test_no_safetensors(tmp_path):
    Qwen2Config(vocab_size=VOCAB, hidden_size=40, intermediate_size=45, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=1).save_pretrained(tmp_path)
    one_line_error(tmp_path, r"no \*.safetensors")


def test_missing_tensor(tmp_path):
    save_checkpoint(tmp_path, tied=False)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    file = tmp_path / index["weight_map"]["model.norm.weight"]
    tensors = {k: v for k, v in load_file(str(file)).items() if k != "model.norm.weight"}
    save_file(tensors, str(file), metadata={"format": "pt"})
    del index["weight_map"]["model.norm.weight"]
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    one_line_error(tmp_path, "lacks 1 tensor.*model.norm.weight")


def test_index_names_a_missing_file(tmp_path):
    save_checkpoint(tmp_path, tied=False)
    next(tmp_path.glob("model-00002-*.safetensors")).unlink()
    one_line_error(tmp_path, "which is missing")


def test_bad_lora_targets():
    with pytest.raises(ValueError, match="lora_targets"):
        build_lm(ModelConfig(lora_rank=4, lora_targets="q_proj,lm_head"), seed=0)
