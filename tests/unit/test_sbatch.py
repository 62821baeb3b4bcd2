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
