"""The catalogue of bad input: each is refused by `hpc.submit` with one line, exit code 2, nothing created."""

import json

import pytest

from grpo.data import write_rows
from grpo.tiny import build_tiny_model, build_tokenizer, save_tokenizer
from hpc.submit import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-model")
    build_tiny_model(0).save_pretrained(path, safe_serialization=True)
    save_tokenizer(build_tokenizer(), path)
    return path


def row(question, answer="7"):
    return {"prompt": [{"role": "user", "content": question}], "data_source": "openai/gsm8k",
            "reward_model": {"style": "rule", "ground_truth": answer}}


def refuse(tmp_path, capsys, *overrides, words=()):
    out = tmp_path / "runs"
    args = ["--preset", "local", "--set", f"out_dir={out}"]
    for o in overrides:
        args += ["--set", o]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert all(w in err[0] for w in words), err[0]
    assert not out.exists()
    return err[0]


def test_missing_model_path(tmp_path, capsys):
    refuse(tmp_path, capsys, f"model.path={tmp_path / 'nope'}", words=["model.path", "not a folder"])


def test_unreadable_or_foreign_model(tmp_path, capsys, model_dir):
    bad = tmp_path / "gpt2"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    refuse(tmp_path, capsys, f"model.path={bad}", words=["'gpt2'", "llama", "qwen2", "qwen3", "mistral"])
    (bad / "config.json").write_text("{not json")
    refuse(tmp_path, capsys, f"model.path={bad}", words=["cannot read config.json"])


def test_dataset_without_the_required_columns(tmp_path, capsys, model_dir):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n")
    refuse(tmp_path, capsys, f"model.path={model_dir}", "data.task=dataset", f"data.train_path={data}",
           words=["data.train_path", "'prompt'", "grpo.preprocess"])


def test_every_prompt_longer_than_the_limit(tmp_path, capsys, model_dir):
    data = tmp_path / "d.parquet"
    write_rows(data, [row("repeat 7 : " * 10), row("copy 1 2 3 : " * 10)])
    refuse(tmp_path, capsys, f"model.path={model_dir}", "data.task=dataset", f"data.train_path={data}",
           "data.max_prompt_len=8", words=["all 2 prompts", "data.max_prompt_len=8"])


def test_missing_dataset_and_wrong_suffix(tmp_path, capsys, model_dir):
    refuse(tmp_path, capsys, f"model.path={model_dir}", "data.task=dataset",
           f"data.train_path={tmp_path / 'none.parquet'}", words=["does not exist"])
    (tmp_path / "d.csv").write_text("a,b\n")
    refuse(tmp_path, capsys, f"model.path={model_dir}", "data.task=dataset", f"data.train_path={tmp_path / 'd.csv'}",
           words=[".csv"])


def test_gpu_preset_on_a_cluster_without_its_gpu_type(tmp_path, capsys):
    sinfo = tmp_path / "cluster.txt"
    sinfo.write_text(
        "NODELIST|PARTITION|STATE|STATE|GRES|GRES_USED|CPUS|MEMORY|AVAIL|TIMELIMIT|REASON\n"
        + "".join(f"a{i}|a100*|idle|idle|gpu:a100:8(S:0-1)|gpu:a100:0(IDX:N/A)|64|1024000|up|infinite|none\n"
                  for i in range(4)))
    out = tmp_path / "runs"
    assert main(["--preset", "h800x32", "--cluster-file", str(sinfo), "--set", f"out_dir={out}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "gpu:h800:8" in err[0] and not out.exists()
