"""Reward plug-ins and the scoring pool: real worker processes, a scorer that really hangs, verl's strict GSM8K."""

import json
import time

import pytest

from grpo.config import ConfigError, apply_overrides
from grpo.rewards import gsm8k_reward, gsm8k_reward_verl, reward_fn_for
from grpo.scoring import ScoringPool, load_function, split_result
from hpc.checks import check_reward
from hpc.presets import get_preset

PLUGIN = '''
import os, time

def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    if solution_str == "hang":
        time.sleep(3600)
    if solution_str == "die":
        os._exit(3)
    if solution_str == "raise":
        raise KeyError("boom")
    right = float(solution_str.strip() == ground_truth)
    return {"score": right, "length": len(solution_str), "index": (extra_info or {}).get("index", -1)}

def plain(data_source, solution_str, ground_truth, extra_info=None):
    return 0.5
'''


@pytest.fixture
def plugin(tmp_path):
    path = tmp_path / "my_reward.py"
    path.write_text(PLUGIN)
    return path


# ------------------------------------------------------------------ verl's strict GSM8K beside the lenient one


@pytest.mark.parametrize("response,truth,strict,lenient", [
    ("so #### 72", "72", 1.0, 1.0),
    ("so #### 1,200", "1200", 1.0, 1.0),  # both remove commas
    ("so #### $1,200", "1200", 0.0, 1.0),  # verl's pattern wants a digit or minus right after '#### '
    ("so #### 72.0", "72", 0.0, 1.0),  # verl compares strings
    ("#### 72\n" + "and then more words " * 20, "72", 0.0, 1.0),  # verl reads only the last 300 characters
    ("#### 71 then #### 72", "72", 1.0, 1.0),  # both: the last one
    ("####72", "72", 0.0, 1.0),  # verl needs the space
    ("no answer", "72", 0.0, 0.0),
])
def test_strict_and_lenient_gsm8k_disagree_where_verl_is_literal(response, truth, strict, lenient):
    assert gsm8k_reward_verl(response, truth) == strict
    assert gsm8k_reward(response, truth) == lenient
    assert reward_fn_for("openai/gsm8k", gsm8k="strict") is gsm8k_reward_verl
    assert reward_fn_for("openai/gsm8k") is gsm8k_reward


def test_unknown_data_source_names_the_known_ones_and_the_plugin():
    with pytest.raises(ValueError, match=r"'my/data'.*openai/gsm8k.*reward.function="):
        reward_fn_for("my/data")


def test_dict_results_split_into_score_and_extras():
    assert split_result({"score": 1, "acc": True, "pred": "72"}) == (1.0, {"acc": 1.0})
    assert split_result(0.25) == (0.25, {})
    with pytest.raises(ValueError, match="without 'score'"):
        split_result({"acc": 1.0})


def test_load_function_names_what_is_wrong(plugin, tmp_path):
    assert load_function(f"{plugin}:plain")("s", "x", "y") == 0.5
    with pytest.raises(ValueError, match="has no function 'nope'; its functions: compute_score, plain"):
        load_function(f"{plugin}:nope")
    with pytest.raises(ValueError, match="is not a file"):
        load_function(f"{tmp_path}/missing.py:fn")
    with pytest.raises(ValueError, match="path/to/file.py:function_name"):
        load_function(str(plugin))


# ------------------------------------------------------------------ the pool


def test_a_hung_scorer_costs_a_zero_reward_and_a_counted_timeout_not_the_batch(plugin):
    tasks = [("s", r, "7", {"index": i}) for i, r in enumerate(["7", "hang", "7", "8", "raise", "die", "7", "hang"])]
    with ScoringPool(function=f"{plugin}:compute_score", workers=2, timeout_s=1.5) as pool:
        first = {w.proc.pid for w in pool.workers}
        t0 = time.monotonic()
        rewards, extras, stats = pool.score(tasks)
        took = time.monotonic() - t0
        assert rewards == [1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        assert stats["timeouts"] == 2 and stats["errors"] == 2  # the KeyError and the dead worker
        assert extras[0] == {"length": 1.0, "index": 0.0} and extras[6]["index"] == 6.0
        assert took < 30, took  # two hangs cost their time limit each, not an hour
        # the hung and the dead workers were killed and replaced; the pool still scores
        assert pool.replaced == 3 and len(pool.workers) == 2 and all(w.proc.is_alive() for w in pool.workers)
        assert {w.proc.pid for w in pool.workers} != first
        assert pool.score([("s", "5", "5", None)])[0] == [1.0]


def test_builtin_scorers_in_the_pool_equal_the_functions():
    tasks = [("openai/gsm8k", "#### $1,200", "1200", None), ("openai/gsm8k", "#### 72.0", "72", None),
             ("DigitalLearningGmbH/MATH-lighteval", r"so \boxed{\frac{1}{2}}", "0.5", None)]
    with ScoringPool(gsm8k="strict", workers=2) as strict, ScoringPool(gsm8k="lenient", workers=1) as lenient:
        assert strict.score(tasks)[0] == [0.0, 0.0, 1.0]
        assert lenient.score(tasks)[0] == [1.0, 1.0, 1.0]


# ------------------------------------------------------------------ login-node checks


def dataset_cfg(tmp_path, *overrides, source="openai/gsm8k"):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"data_source": source, "prompt": [{"role": "user", "content": "q"}],
                                "reward_model": {"ground_truth": "7"}, "extra_info": {"index": 0}}) + "\n")
    return apply_overrides(get_preset("local"), ["data.task=dataset", f"data.train_path={data}", *overrides])


def test_check_refuses_an_unknown_data_source_naming_the_known_ones_and_the_plugin(tmp_path):
    with pytest.raises(ConfigError, match=r"'my/source' has no built-in scorer.*openai/gsm8k.*reward.function="):
        check_reward(dataset_cfg(tmp_path, source="my/source"))
    assert check_reward(dataset_cfg(tmp_path)) == []


def test_check_calls_the_plugin_once_on_a_sample_row(tmp_path, plugin):
    notes = check_reward(dataset_cfg(tmp_path, f"reward.function={plugin}:compute_score", source="my/source"))
    assert len(notes) == 1 and "compute_score()" in notes[0] and "my/source" in notes[0] and " 1" in notes[0]


@pytest.mark.parametrize("body,match", [
    ("def fn(a, b, c, d=None):\n    import time; time.sleep(3600)\n", "did not return within"),
    ("def fn(a, b, c, d=None):\n    return {'acc': 1}\n", "without 'score'"),
    ("def fn(a, b):\n    return 1.0\n", "TypeError"),
    ("def other():\n    pass\n", "has no function 'fn'"),
    ("import no_such_module_here\n", "ModuleNotFoundError"),
])
def test_check_refuses_a_plugin_that_hangs_breaks_or_is_missing(tmp_path, body, match):
    path = tmp_path / "r.py"
    path.write_text(body)
    with pytest.raises(ConfigError, match=match):
        check_reward(dataset_cfg(tmp_path, f"reward.function={path}:fn", "reward.timeout_s=2"))
    with pytest.raises(ConfigError, match="is not a file here"):
        check_reward(dataset_cfg(tmp_path, f"reward.function={tmp_path}/nope.py:fn"))


def test_bad_pool_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="workers >= 0"):
        ScoringPool(workers=-1)
    with pytest.raises(ConfigError, match="timeout_s must be > 0"):
        check_reward(dataset_cfg(tmp_path, "reward.timeout_s=0"))
