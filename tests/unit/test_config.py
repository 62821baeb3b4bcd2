"""Tests for grpo/config.py: typed overrides, their error messages, copies and the JSON round trip."""

import json
from typing import Literal, Optional

import pytest

from grpo.config import (Config, ConfigError, TrainConfig, apply_overrides, flat_keys, from_dict, parse_value,
                         to_dict, to_json)
from hpc.presets import get_preset


def _get(cfg, key):
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


@pytest.mark.parametrize("item, key, want", [
    ("train.steps=20", "train.steps", 20),
    ("train.seed=-3", "train.seed", -3),
    ("train.lr=1e-5", "train.lr", 1e-5),
    ("train.lr=3", "train.lr", 3.0),
    ("rollout.temperature=0.7", "rollout.temperature", 0.7),
    *[(f"algo.leave_one_out={s}", "algo.leave_one_out", True) for s in ("true", "True", "1", "yes", "ON")],
    *[(f"algo.norm_adv_by_std={s}", "algo.norm_adv_by_std", False) for s in ("false", "FALSE", "0", "no", "off")],
    ("data.task=copy", "data.task", "copy"),
    ("name=a=b", "name", "a=b"),  # only the first '=' separates key and value
    ("job.gpu_type=h100", "job.gpu_type", "h100"),
    ("job.partition=None", "job.partition", None),
    ("job.partition=null", "job.partition", None),
    ("rollout.engine=vllm", "rollout.engine", "vllm"),
    ("model.dtype=bfloat16", "model.dtype", "bfloat16"),
])
def test_override_parses_by_field_type(item, key, want):
    cfg = apply_overrides(get_preset("local"), [item])
    got = _get(cfg, key)
    assert got == want and type(got) is type(want)


def test_optional_override_back_to_none_and_later_override_wins():
    cfg = apply_overrides(Config(), ["job.partition=gpu", "job.partition=none", "train.steps=1", "train.steps=2"])
    assert cfg.job.partition is None and cfg.train.steps == 2


@pytest.mark.parametrize("hint, text, want", [
    (Optional[int], "none", None), (Optional[int], "4", 4), (int | None, "NULL", None), (float | None, "2.5", 2.5),
])
def test_parse_value_optional(hint, text, want):
    assert parse_value(text, hint, "k") == want


@pytest.mark.parametrize("item, words", [
    ("train.steps=abc", ["train.steps", "int"]),
    ("train.steps=1e3", ["train.steps", "int"]),
    ("train.steps=2.0", ["train.steps", "int"]),
    ("train.lr=fast", ["train.lr", "float"]),
    ("algo.leave_one_out=maybe", ["algo.leave_one_out", "bool"]),
    ("rollout.engine=sglang", ["rollout.engine", "native", "vllm"]),
    ("model.dtype=float16", ["model.dtype", "float32", "bfloat16"]),
])
def test_bad_value_names_key_and_type(item, words):
    with pytest.raises(ConfigError) as e:
        apply_overrides(Config(), [item])
    assert all(w in str(e.value) for w in words), str(e.value)


def test_literal_is_case_sensitive():
    with pytest.raises(ConfigError):
        parse_value("Native", Literal["native", "vllm"], "rollout.engine")


@pytest.mark.parametrize("item", ["train.stepz=3", "steps=3", "train=3", "train.lr.x=1"])
def test_unknown_key_lists_valid_keys(item):
    with pytest.raises(ConfigError) as e:
        apply_overrides(Config(), [item])
    msg = str(e.value)
    assert repr(item.split("=")[0]) in msg
    for key in ("train.lr", "train.steps", "rollout.n", "job.trainer_ranks", "algo.kl_coef"):
        assert key in msg
    assert set(flat_keys(Config())) <= set(msg.split("valid keys: ")[1].split(", "))


@pytest.mark.parametrize("item", ["foo", "train.steps", ""])
def test_override_without_equals(item):
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides(Config(), [item])


def test_apply_overrides_does_not_mutate_the_preset():
    base = get_preset("local")
    before = to_dict(base)
    out = apply_overrides(base, ["train.steps=5", "job.partition=x", "rollout.engine=vllm"])
    assert to_dict(base) == before
    assert out.train is not base.train and out.train.steps == 5 and base.train.steps == 300
    # a failing override leaves the input untouched too
    with pytest.raises(ConfigError):
        apply_overrides(base, ["train.steps=7", "nope=1"])
    assert to_dict(base) == before


@pytest.mark.parametrize("cfg", [Config(), get_preset("local"),
                                 apply_overrides(get_preset("local"), ["job.gpu_type=h100", "train.lr=1e-5"])])
def test_round_trip(cfg):
    back = from_dict(to_dict(cfg))
    assert back == cfg and back is not cfg and isinstance(back.train, TrainConfig)
    text = to_json(cfg)
    data = json.loads(text)  # valid JSON
    assert data == to_dict(cfg)
    assert from_dict(data) == cfg


def test_from_dict_fills_missing_fields_with_defaults():
    cfg = from_dict({"name": "old", "train": {"steps": 3}})
    assert cfg.name == "old" and cfg.train.steps == 3
    assert cfg.train.lr == TrainConfig().lr and cfg.rollout == Config().rollout
