"""--config run.yaml: a real YAML file, nested or dotted keys, --set on top, unknown keys refused, and the resolved
config written back as YAML."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from grpo.config import ConfigError, apply_mapping, apply_overrides, read_config_file, to_dict, to_yaml
from hpc.presets import get_preset
from hpc.submit import main

ROOT = Path(__file__).resolve().parents[2]


def test_nested_and_dotted_keys_apply_with_their_types(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("preset: local\n"
                    "train:\n  steps: 7\n  lr: 1e-4\n"  # YAML 1.1 reads 1e-4 as a string: typed by the field
                    "rollout:\n  top_p: 0.9\n  top_k: 20\n"
                    "algo.leave_one_out: true\n"
                    "job:\n  partition: null\n  account: proj42\n")
    data = read_config_file(str(path))
    assert data.pop("preset") == "local"
    cfg = apply_mapping(get_preset("local"), data)
    assert (cfg.train.steps, cfg.train.lr, cfg.rollout.top_p, cfg.rollout.top_k) == (7, 1e-4, 0.9, 20)
    assert type(cfg.train.lr) is float and cfg.algo.leave_one_out is True
    assert cfg.job.partition is None and cfg.job.account == "proj42"


@pytest.mark.parametrize("text,match", [
    ("train:\n  stepz: 3\n", "unknown key 'train.stepz'; valid keys: .*train.steps"),
    ("train:\n  steps: many\n", "train.steps='many' is not an int"),
    ("train:\n  steps: [1, 2]\n", "train.steps is a list"),
    ("- a\n- b\n", "expected a mapping"),
    ("train: [\n", "not valid YAML"),
])
def test_bad_files_are_refused_naming_the_key(tmp_path, text, match):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        apply_mapping(get_preset("local"), read_config_file(str(path)))


def test_the_resolved_yaml_is_a_config_file_for_the_same_run(tmp_path):
    cfg = apply_overrides(get_preset("h800x32"), ["train.lr=3e-7", "data.train_path=a.parquet,b/*.parquet"])
    path = tmp_path / "config.yaml"
    path.write_text(to_yaml(cfg))
    assert yaml.safe_load(path.read_text())["train"]["lr"] == 3e-7  # nested as the sections
    assert to_dict(apply_mapping(get_preset("local"), read_config_file(str(path)))) == to_dict(cfg)


def test_cli_config_file_then_set_on_top(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("preset: local\ntrain:\n  steps: 9\n  seed: 4\n")
    out = tmp_path / "runs"
    assert main(["--config", str(path), "--set", "train.steps=11", "--dry-run", "--set", f"out_dir={out}"]) == 0
    text = capsys.readouterr().out
    assert "11 steps" in text and not out.exists()


def test_cli_bad_config_file_is_one_line_exit_2_nothing_created(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  stepz: 3\n")
    out = tmp_path / "runs"
    p = subprocess.run([sys.executable, "-m", "hpc.submit", "--preset", "local", "--config", str(path), "--set",
                        f"out_dir={out}"], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "unknown key 'train.stepz'" in p.stderr and not out.exists()
    p = subprocess.run([sys.executable, "-m", "hpc.submit", "--preset", "h800x32", "--config", str(path)],
                       capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 2
    path.write_text("preset: local\n")
    p = subprocess.run([sys.executable, "-m", "hpc.submit", "--preset", "h800x32", "--config", str(path)],
                       capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 2 and "disagree" in p.stderr
