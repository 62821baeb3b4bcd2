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
