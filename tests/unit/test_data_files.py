"""Several training files (a comma-separated list or a glob) as one prompt set, shuffled per epoch across them,
with an exact resume."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from grpo.data import expand_paths, load_prompts
from grpo.tiny import build_tokenizer


def row(i, source="openai/gsm8k"):
    return {"data_source": source, "prompt": [{"role": "user", "content": f"repeat {i % 10} :"}],
            "reward_model": {"style": "rule", "ground_truth": str(i)}, "extra_info": {"index": i}}


@pytest.fixture
def files(tmp_path):
    pq.write_table(pa.Table.from_pylist([row(i) for i in range(0, 5)]), tmp_path / "b.parquet")
    pq.write_table(pa.Table.from_pylist([row(i) for i in range(5, 9)]), tmp_path / "a.parquet")
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(row(i)) + "\n" for i in range(9, 12)))
    return tmp_path


def truths(prompts):
    return [x.ground_truth for x in prompts]


def test_a_glob_is_sorted_and_a_list_keeps_its_order(files):
    assert [p.name for p in expand_paths(f"{files}/*.parquet")] == ["a.parquet", "b.parquet"]
    listed = load_prompts(f"{files}/c.jsonl, {files}/b.parquet", tokenizer=build_tokenizer(), max_prompt_len=16)
    assert truths(listed) == [str(i) for i in (9, 10, 11, 0, 1, 2, 3, 4)]
    mixed = load_prompts(f"{files}/*.parquet,{files}/c.jsonl", tokenizer=build_tokenizer(), max_prompt_len=16)
    assert truths(mixed) == [str(i) for i in (5, 6, 7, 8, 0, 1, 2, 3, 4, 9, 10, 11)]
    assert mixed[0].extra_info == {"index": 5} and "3 files" in mixed.report


def test_epochs_shuffle_across_files_and_resume_exactly(files):
    prompts = load_prompts(f"{files}/*", tokenizer=build_tokenizer(), max_prompt_len=16)
    assert len(prompts) == 12
    batches = prompts.batches(batch_size=4, seed=3)
    epoch0 = [truths(next(batches)) for _ in range(3)]
    seen = sorted(t for b in epoch0 for t in b)
    assert seen == sorted(str(i) for i in range(12))  # every prompt of every file once per epoch
    mixes = [{int(t) < 5, 5 <= int(t) < 9, int(t) >= 9} for t in epoch0[0]]
    assert len(set().union(*mixes)) > 1  # a batch mixes the files
    state = json.loads(json.dumps(batches.state_dict()))
    epoch1 = [truths(next(batches)) for _ in range(3)]
    assert epoch1 != epoch0  # a fresh permutation per epoch
    again = load_prompts(f"{files}/*", tokenizer=build_tokenizer(), max_prompt_len=16).batches(batch_size=4, seed=3)
    again.load_state_dict(state)
    assert [truths(next(again)) for _ in range(3)] == epoch1


def test_a_glob_matching_nothing_and_a_missing_file_are_refused(files):
    with pytest.raises(ValueError, match="matches no file"):
        expand_paths(f"{files}/*.csv")
    with pytest.raises(ValueError, match="does not exist"):
        load_prompts(f"{files}/a.parquet,{files}/nope.parquet", tokenizer=build_tokenizer(), max_prompt_len=16)
