"""The sbatch script a plan turns into (golden file), and values that must stay literal."""

import sys
from pathlib import Path

from grpo.config import apply_overrides
from hpc.plan import plan_job
from hpc.presets import get_preset
from hpc.submit import render_sbatch, slurm_parameters

GOLDEN = Path(__file__).parents[1] / "fixtures" / "sbatch_h800x32.txt"


def rendered(cfg, **plan_fields):
    plan = plan_job(cfg)
    for k, v in plan_fields.items():
        setattr(plan, k, v)
    return render_sbatch(cfg, plan, Path("/runs/h800x32-x")).replace(sys.executable, "PYTHON")


def test_h800x32_script_matches_the_golden_file():
    text = rendered(get_preset("h800x32"), partition="h800", nodelist=["g1", "g2", "g3", "g4"])
    if not GOLDEN.exists():  # first run writes it; review it and commit
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text()


def test_parameters_one_task_per_gpu_with_typed_gres():
    cfg = get_preset("h100x8-lora")
    params = slurm_parameters(cfg, plan_job(cfg))
    assert params["nodes"] == 1 and params["ntasks_per_node"] == 8 and params["gres"] == "gpu:h100:8"
    assert "--kill-on-bad-exit=1" in params["srun_args"]


def test_shell_characters_stay_literal(tmp_path):
    """Values reach sbatch as quoted strings, never through a shell: a run folder with shell syntax is a path."""
    cfg = get_preset("h800x32")
    plan = plan_job(cfg)
    evil = Path("/runs/a b;$(touch /tmp/pwned)")
    text = render_sbatch(cfg, plan, evil)
    assert "'/runs/a b;$(touch /tmp/pwned)/logs/%j'" in text
    commands = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert all("$(touch" not in line.replace("'/runs/a b;$(touch /tmp/pwned)", "") for line in commands)


def test_a_name_with_shell_characters_is_refused():
    import pytest

    from grpo.config import ConfigError

    with pytest.raises(ConfigError, match="name="):
        plan_job(apply_overrides(get_preset("h800x32"), ["name=x; rm -rf /"]))


def test_dry_run_against_a_saved_cluster_prints_the_plan_and_script(tmp_path, capsys):
    from hpc.submit import main

    header = "NODELIST|PARTITION|STATE|STATECOMPLETE|GRES|GRES_USED|CPUS|MEMORY|AVAIL|TIMELIMIT|REASON\n"
    rows = [f"g{i}|h800|{state}|{state}|gpu:h800:8|gpu:h800:0(IDX:N/A)|128|2048000|up|2-00:00:00|none\n"
            for i, state in enumerate(["drained", "idle", "idle", "idle", "idle"])]
    saved = tmp_path / "cluster.txt"
    saved.write_text(header + "".join(rows))
    out = tmp_path / "runs"
    assert main(["--preset", "h800x32", "--dry-run", "--cluster-file", str(saved), "--set", f"out_dir={out}"]) == 0
    text = capsys.readouterr().out
    assert "partition h800, nodes g1,g2,g3,g4" in text and "skipped node g0: drained" in text
    assert "#SBATCH --nodelist=g1,g2,g3,g4" in text and "#SBATCH --gres=gpu:h800:8" in text
    assert "dry run: nothing submitted" in text and not out.exists()


def test_lora_with_vllm_preset_passes_every_check(tmp_path, capsys, monkeypatch):
    """h100x8-lora (LoRA + vLLM) is no longer refused: with its model folder, a dataset and vLLM in place, the dry
    run shows the plan and the merged-weight sync, and no check would refuse the submission."""
    import importlib.util
    import json

    from grpo.tiny import build_tokenizer, save_tokenizer
    from hpc.submit import main

    model = tmp_path / "Qwen2.5-72B-Instruct"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "model_type": "qwen2", "hidden_size": 8192, "num_hidden_layers": 80, "num_attention_heads": 64,
        "num_key_value_heads": 8, "intermediate_size": 29568, "vocab_size": 152064, "tie_word_embeddings": False}))
    (model / "model.safetensors").write_bytes(b"")  # the checks look for weights, they do not read them
    save_tokenizer(build_tokenizer(), model)
    data = Path(__file__).parents[2] / "grpo" / "sample_data" / "train.parquet"
    saved = tmp_path / "cluster.txt"
    saved.write_text("NODELIST|PARTITION|STATE|STATECOMPLETE|GRES|GRES_USED|CPUS|MEMORY|AVAIL|TIMELIMIT|REASON\n"
                     "h1|h100|idle|idle|gpu:h100:8|gpu:h100:0(IDX:N/A)|128|2048000|up|2-00:00:00|none\n")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "vllm" else find_spec(name, *a))
    out = tmp_path / "runs"
    argv = ["--preset", "h100x8-lora", "--dry-run", "--cluster-file", str(saved), "--set", f"out_dir={out}",
            "--set", f"model.path={model}", "--set", f"data.train_path={data}"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "LoRA r=32" in text and "vllm engine" in text and "merged LoRA weights" in text
    assert "would be refused" not in text, text
    assert "dry run: nothing submitted" in text and not out.exists()
