"""`python -m grpo.export` on runs of the `local` preset (the tiny Qwen2 with its 20-word tokenizer): a LoRA run
exported merged and as a peft adapter folder (peft's own merge of that adapter equals our merged export), the
tokenizer read back by AutoTokenizer as our loader reads it, and bad input refused with one line, exit 2."""

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from grpo.export import main
from grpo.tiny import build_tiny_model, build_tokenizer
from tests.e2e.test_local_preset import submit

LORA = ["model.lora_rank=4", "model.lora_alpha=8", "model.lora_targets=all-linear"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    _, run_dir = submit(tmp_path_factory.mktemp("lora"), *LORA, "train.steps=2", "train.lr=0.05")
    return run_dir


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """Full fine-tuning on two FSDP2 trainer ranks: a checkpoint in two shard files."""
    _, run_dir = submit(tmp_path_factory.mktemp("full"), "train.steps=1", "job.trainer_ranks=2")
    return run_dir


def test_checkpoint_of_two_ranks_exports_as_the_run_ended(full_run, tmp_path):
    assert len(list((full_run / "checkpoints" / "step_00000001").glob("*.distcp"))) == 2
    assert main([str(full_run), "--out", str(tmp_path / "out")]) == 0
    ours = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).state_dict()
    end = AutoModelForCausalLM.from_pretrained(str(full_run / "hf")).state_dict()  # the loop's own export
    assert ours.keys() == end.keys() and all(torch.equal(ours[k], end[k]) for k in end)
    assert any(not torch.equal(ours[k], v) for k, v in build_tiny_model(0).state_dict().items())


def test_lora_merged_and_adapter_exports_agree_with_peft(lora_run, tmp_path):
    merged_dir, adapter_dir = tmp_path / "merged", tmp_path / "adapter"
    assert main([str(lora_run), "--out", str(merged_dir)]) == 0
    assert main([str(lora_run), "--adapter", "--out", str(adapter_dir)]) == 0
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (4, 8)
    adapter = load_file(str(adapter_dir / "adapter_model.safetensors"))
    assert any(v.abs().max() > 0 for k, v in adapter.items() if "lora_B" in k)  # trained: B moved off zero
    base = build_tiny_model(0)  # the run's base: model.path=tiny, train.seed=0
    peft_merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload().state_dict()
    ours = AutoModelForCausalLM.from_pretrained(str(merged_dir)).state_dict()
    assert ours.keys() == peft_merged.keys()
    worst = max((ours[k] - peft_merged[k]).abs().max().item() for k in ours)
    assert worst < 1e-6, worst
    assert any(not torch.equal(ours[k], build_tiny_model(0).state_dict()[k]) for k in ours)


def test_tiny_tokenizer_loads_back_with_autotokenizer(lora_run, tmp_path):
    out = tmp_path / "model"
    assert main([str(lora_run), "--out", str(out)]) == 0
    tok, ours = AutoTokenizer.from_pretrained(str(out)), build_tokenizer()
    text = "repeat 7 : 7 7 then add 3 + 4 = <eos>"
    assert tok(text).input_ids == ours(text).input_ids
    assert len(tok(text).input_ids) == 12 and tok.unk_token_id not in tok(text).input_ids
    assert tok.decode(ours(text).input_ids) == text
    assert (tok.pad_token, tok.eos_token) == ("<pad>", "<eos>")


def refuse(capsys, *args, words=()):
    assert main([str(a) for a in args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert all(w in err[0] for w in words), err[0]


def test_bad_input_is_one_line_exit_2(full_run, tmp_path, capsys):
    refuse(capsys, tmp_path / "nope", words=["not a run folder"])
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((full_run / "config.json").read_text())
    refuse(capsys, empty, words=["no complete checkpoint"])
    refuse(capsys, full_run, "--step", "7", words=["no checkpoint of step 7", "step(s) 1"])
    refuse(capsys, full_run, "--adapter", words=["--adapter", "lora_rank=0"])
    refuse(capsys, full_run, "--dtype", "float8", words=["--dtype"])
    assert not (full_run / "export").exists()  # nothing written for refused input
