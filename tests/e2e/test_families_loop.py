"""Each model family through the real loop (`python -m hpc.submit --preset local --set model.path=...`): a tiny
Llama 3, Qwen2, Qwen3 and Mistral checkpoint folder, two GRPO steps with the weight sync to the native engine and
a checkpoint per step; then `python -m grpo.export` of both checkpoints, read back by transformers."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from grpo.data import load_pretrained_tokenizer
from grpo.export import main as export_main
from grpo.tiny import save_tiny_checkpoint
from tests.e2e.test_local_preset import submit

ROOT = __import__("pathlib").Path(__file__).parents[2]


@pytest.fixture(scope="module", params=["llama", "qwen3", "qwen2", "mistral"])
def run(request, tmp_path_factory):
    base = tmp_path_factory.mktemp(request.param)
    folder = save_tiny_checkpoint(base / "model", request.param, seed=1)
    proc, run_dir = submit(base, f"model.path={folder}", "train.steps=2", "train.checkpoint_every=1")
    return request.param, folder, run_dir, proc


def weights(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_two_grpo_steps_with_weight_sync(run):
    family, folder, run_dir, proc = run
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["grad_norm"] > 0 and r["response_len"] > 0 for r in rows)
    # step 2 sampled with the weights step 1 produced, sent through the sync: the engine's log-probs of its own
    # samples equal the trainer's under the updated policy
    assert max(r["mismatch_abs"] for r in rows) < 1e-4
    hf = AutoModelForCausalLM.from_pretrained(str(run_dir / "hf"))
    assert hf.config.model_type == family
    trained, start = weights(run_dir / "hf"), weights(folder)
    assert trained.keys() == start.keys()
    assert any(not torch.equal(trained[k], start[k]) for k in start)


def test_export_of_each_checkpoint(run, tmp_path):
    family, folder, run_dir, _ = run
    outs = {1: tmp_path / "step1", 2: run_dir / "export" / "step_2"}
    assert export_main([str(run_dir), "--step", "1", "--out", str(outs[1])]) == 0  # in this process
    proc = subprocess.run([sys.executable, "-m", "grpo.export", str(run_dir)],  # the latest, to the default folder
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0 and f"to {outs[2]}" in proc.stdout, proc.stderr[-2000:]
    # the last checkpoint is what the loop exported at the end; the first is not
    last, first, end = weights(outs[2]), weights(outs[1]), weights(run_dir / "hf")
    assert last.keys() == end.keys() and all(torch.equal(last[k], end[k]) for k in end)
    assert any(not torch.equal(first[k], end[k]) for k in end)
    model = AutoModelForCausalLM.from_pretrained(str(outs[2]))
    assert model.config.model_type == family
    ours, text = load_pretrained_tokenizer(folder), "repeat 7 : 7 7 7 then copy 3 + 4 = 7"
    for exported in (outs[2], run_dir / "hf"):  # ours and the loop's own export at the end
        tok = AutoTokenizer.from_pretrained(str(exported))
        assert tok(text).input_ids == ours(text).input_ids and len(ours(text).input_ids) == 13, exported
