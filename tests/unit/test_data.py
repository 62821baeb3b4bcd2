"""Prompt datasets (grpo.data), the raw-dataset converter (python -m grpo.preprocess) and the built-in sample.

Files are real parquet and jsonl files written with pyarrow and json directly; the chat-template tokenizer is a
byte-level BPE trained here in memory, so nothing is downloaded.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from grpo import preprocess
from grpo.data import PromptBatches, PromptItem, load_prompts, read_rows, sample_path
from grpo.rewards import gsm8k_reward, math_reward, reward_fn_for
from grpo.tiny import build_tokenizer

REPO = Path(__file__).resolve().parents[2]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
GSM8K_INSTRUCTION = 'Let\'s think step by step and output the final answer after "####".'


def train_tokenizer(*, chat_template):
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<|im_start|>", "<|im_end|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    texts = [r["prompt"][0]["content"] for r in preprocess.sample_rows()["train"]]
    core.train_from_iterator(texts, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<|im_end|>")
    tok.chat_template = chat_template
    return tok


@pytest.fixture(scope="module")
def chat_tok():
    return train_tokenizer(chat_template=CHAT_TEMPLATE)


def verl_row(question, answer, *, source="openai/gsm8k", index=0):
    return {"data_source": source, "prompt": [{"role": "user", "content": question}], "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": answer},
            "extra_info": {"split": "train", "index": index}}


ROWS = [verl_row("How many legs do 3 cats have?", "12", index=0),
        verl_row("What is 7 times 8 minus 6?", "50", index=1),
        verl_row(r"Simplify \frac{6}{4}.", r"\frac{3}{2}", source="DigitalLearningGmbH/MATH-lighteval", index=2),
        verl_row("A farmer has 15 cows and buys 27 more. Then he sells a third of them. How many are left?", "28",
                 index=3)]


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------- loading


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_load_prompts_applies_the_chat_template(tmp_path, chat_tok, suffix):
    path = (write_parquet if suffix == ".parquet" else write_jsonl)(tmp_path / f"d{suffix}", ROWS)
    ps = load_prompts(path, tokenizer=chat_tok, max_prompt_len=512)
    assert len(ps) == len(ROWS) and ps.num_dropped == 0
    for item, row in zip(ps, ROWS):
        want_ids = chat_tok.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True,
                                                return_dict=False)
        assert item.prompt_ids == list(want_ids)
        assert item.text == f"<|im_start|>user\n{row['prompt'][0]['content']}<|im_end|>\n<|im_start|>assistant\n"
        assert chat_tok.decode(item.prompt_ids) == item.text
        assert (item.ground_truth, item.data_source) == (row["reward_model"]["ground_truth"], row["data_source"])
    assert ps.data_sources == ["DigitalLearningGmbH/MATH-lighteval", "openai/gsm8k"]


def test_parquet_and_jsonl_give_the_same_prompts(tmp_path, chat_tok):
    a = load_prompts(write_parquet(tmp_path / "d.parquet", ROWS), tokenizer=chat_tok, max_prompt_len=512)
    b = load_prompts(write_jsonl(tmp_path / "d.jsonl", ROWS), tokenizer=chat_tok, max_prompt_len=512)
    assert list(a) == list(b)


def test_without_chat_template_contents_are_joined(tmp_path):
    """The tiny tokenizer has no chat template: the message contents, newline-joined, encoded as they are."""
    tok = build_tokenizer()
    rows = [verl_row("repeat 7 :", "7 7 7 7"),
            {**verl_row("", "3 1 4"), "prompt": [{"role": "system", "content": "copy"},
                                                 {"role": "user", "content": "3 1 4 :"}]}]
    ps = load_prompts(write_jsonl(tmp_path / "d.jsonl", rows), tokenizer=tok, max_prompt_len=16)
    assert [it.text for it in ps] == ["repeat 7 :", "copy\n3 1 4 :"]
    assert ps[0].prompt_ids == [tok.convert_tokens_to_ids(w) for w in ["repeat", "7", ":"]]
    assert ps[1].prompt_ids == [tok.convert_tokens_to_ids(w) for w in ["copy", "3", "1", "4", ":"]]


def test_a_plain_string_prompt_is_one_user_message(tmp_path, chat_tok):
    rows = [{**ROWS[0], "prompt": ROWS[0]["prompt"][0]["content"]}]
    ps = load_prompts(write_jsonl(tmp_path / "d.jsonl", rows), tokenizer=chat_tok, max_prompt_len=512)
    assert ps[0].prompt_ids == load_prompts(write_jsonl(tmp_path / "e.jsonl", ROWS[:1]), tokenizer=chat_tok,
                                            max_prompt_len=512)[0].prompt_ids


def test_long_prompts_are_dropped_and_counted(tmp_path, chat_tok):
    path = write_parquet(tmp_path / "d.parquet", ROWS)
    lengths = [len(chat_tok.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=True,
                                                return_dict=False)) for r in ROWS]
    limit = sorted(lengths)[1]  # keeps the two shortest (and any tied with them)
    ps = load_prompts(path, tokenizer=chat_tok, max_prompt_len=limit)
    kept = [r["reward_model"]["ground_truth"] for r, n in zip(ROWS, lengths) if n <= limit]
    assert [it.ground_truth for it in ps] == kept
    assert ps.num_dropped == len(ROWS) - len(kept) > 0
    assert f"{ps.num_dropped} dropped" in ps.report and f"max_prompt_len={limit}" in ps.report
    with pytest.raises(ValueError, match=rf"all 4 prompts .* longer than data.max_prompt_len=3 tokens "
                                         rf"\(shortest: {min(lengths)}\); raise it"):
        load_prompts(path, tokenizer=chat_tok, max_prompt_len=3)


@pytest.mark.parametrize("rows, pattern", [
    ([{"question": "q", "answer": "a"}], r"has no column 'prompt' \(columns: question, answer\); expected verl's"),
    ([{"prompt": [{"role": "user", "content": "q"}], "ground_truth": "1"}], r"has no column 'reward_model'"),
    ([{**ROWS[0], "reward_model": {"style": "rule"}}], r"row 0: 'reward_model' .* no 'ground_truth'"),
    ([ROWS[0], {**ROWS[0], "prompt": [{"role": "user"}]}], r"row 1: 'prompt' is .* expected verl's layout"),
])
@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_bad_rows_name_the_problem(tmp_path, chat_tok, rows, pattern, suffix):
    path = (write_parquet if suffix == ".parquet" else write_jsonl)(tmp_path / f"d{suffix}", rows)
    with pytest.raises(ValueError, match=pattern):
        load_prompts(path, tokenizer=chat_tok, max_prompt_len=512)


def test_bad_files_name_the_problem(tmp_path, chat_tok):
    def load(path):
        return load_prompts(path, tokenizer=chat_tok, max_prompt_len=512)

    (tmp_path / "d.csv").write_text("prompt\n")
    with pytest.raises(ValueError, match=r"suffix '.csv'; readable suffixes: .parquet, .jsonl"):
        load(tmp_path / "d.csv")
    with pytest.raises(ValueError, match="does not exist"):
        load(tmp_path / "missing.parquet")
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="has no rows"):
        load(tmp_path / "e.jsonl")
    (tmp_path / "b.jsonl").write_text(json.dumps(ROWS[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        load(tmp_path / "b.jsonl")
    (tmp_path / "x.parquet").write_text("not parquet")
    with pytest.raises(ValueError, match="not a readable parquet file"):
        load(tmp_path / "x.parquet")


# ---------------------------------------------------------------- batches


def make_items(n):
    return [PromptItem(prompt_ids=[i], ground_truth=str(i), data_source="openai/gsm8k", text=str(i))
            for i in range(n)]


def ids(batch):
    return [it.prompt_ids[0] for it in batch]


def test_batches_are_epoch_permutations_with_drop_last():
    items = make_items(10)
    it = PromptBatches(items, batch_size=4, seed=3)
    assert it.batches_per_epoch == 2
    epochs = []
    for epoch in range(6):
        drawn = [ids(next(it)) for _ in range(2)]
        assert all(len(b) == 4 for b in drawn)
        flat = drawn[0] + drawn[1]
        assert len(set(flat)) == 8 and it.epoch == epoch  # no repeats inside an epoch; 2 left over
        assert flat == it.order(epoch)[:8]
        epochs.append(flat)
    assert len({tuple(e) for e in epochs}) == 6  # a fresh order each epoch
    assert set().union(*map(set, epochs)) == set(range(10))  # leftovers of one epoch come up in others


def test_batches_depend_on_the_seed_only():
    items = make_items(12)
    a, b, c = (PromptBatches(items, batch_size=3, seed=s) for s in (1, 1, 2))
    seq_a = [ids(next(a)) for _ in range(10)]
    assert seq_a == [ids(next(b)) for _ in range(10)]
    assert seq_a != [ids(next(c)) for _ in range(10)]
    assert sorted(sum(seq_a[:4], [])) == list(range(12))


@pytest.mark.parametrize("stop_after", [0, 1, 3, 4, 7])
def test_resume_continues_the_same_sequence(stop_after):
    items = make_items(11)
    ref = PromptBatches(items, batch_size=3, seed=5)
    reference = [ids(next(ref)) for _ in range(12)]
    first = PromptBatches(items, batch_size=3, seed=5)
    for _ in range(stop_after):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))  # checkpoints store it as JSON
    resumed = PromptBatches(items, batch_size=3, seed=5)
    resumed.load_state_dict(state)
    assert [ids(next(resumed)) for _ in range(12 - stop_after)] == reference[stop_after:]


def test_resume_refuses_a_different_setup():
    state = PromptBatches(make_items(11), batch_size=3, seed=5).state_dict()
    for other in (PromptBatches(make_items(10), batch_size=3, seed=5),
                  PromptBatches(make_items(11), batch_size=4, seed=5),
                  PromptBatches(make_items(11), batch_size=3, seed=6)):
        with pytest.raises(ValueError, match="cannot resume the prompt order: it was saved with"):
            other.load_state_dict(state)


def test_batch_larger_than_dataset_is_an_error():
    with pytest.raises(ValueError, match=r"batch size 8 is larger than the dataset \(5 prompts\)"):
        PromptBatches(make_items(5), batch_size=8)


# ---------------------------------------------------------------- the built-in sample


def test_committed_sample_equals_the_generator():
    rows = preprocess.sample_rows()
    assert (len(rows["train"]), len(rows["test"])) == (56, 8)
    for split in ("train", "test"):
        for suffix in (".parquet", ".jsonl"):
            assert read_rows(sample_path(split, suffix=suffix)) == rows[split], (split, suffix)


def test_sample_arithmetic_is_right():
    """Every `<<expr=value>>` step of every worked answer evaluates to its value (exact fractions), and the final
    answer is the last step's value: the sample's ground truths are correct."""
    from fractions import Fraction
    rows = [r for split in preprocess.sample_rows().values() for r in split]
    assert len({r["prompt"][0]["content"] for r in rows}) == 64
    for row in rows:
        steps = re.findall(r"<<([^=>]+)=([^>]+)>>", row["extra_info"]["answer"])
        assert steps
        for expr, value in steps:
            assert re.fullmatch(r"[\d+\-*/(). ]+", expr), expr
            exact = eval(re.sub(r"(\d+)", r"Fraction(\1)", expr), {"Fraction": Fraction})  # noqa: S307
            assert exact == Fraction(value), (expr, value)
        assert Fraction(steps[-1][1]) == Fraction(row["reward_model"]["ground_truth"])
        # the worked answer is a correct response
        assert gsm8k_reward(row["extra_info"]["answer"], row["reward_model"]["ground_truth"]) == 1.0
        assert row["prompt"][0]["content"] == f"{row['extra_info']['question']} {GSM8K_INSTRUCTION}"


def test_sample_loads_with_a_chat_tokenizer(chat_tok):
    ps = load_prompts(sample_path("train"), tokenizer=chat_tok, max_prompt_len=1024)
    assert len(ps) == 56 and ps.num_dropped == 0 and ps.data_sources == ["openai/gsm8k"]
    assert reward_fn_for(ps.data_sources[0]) is gsm8k_reward


# ---------------------------------------------------------------- python -m grpo.preprocess


def gsm8k_raw(n, *, start=0):
    return [{"question": f"Ann has {i} pens and buys {i + 3} more. How many pens does she have?",
             "answer": f"She has {i} + {i + 3} = <<{i}+{i + 3}={2 * i + 3}>>{2 * i + 3}.\n#### {2 * i + 3}"}
            for i in range(start, start + n)]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "grpo.preprocess", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_preprocess_gsm8k_hf_layout_end_to_end(tmp_path, chat_tok):
    """openai/gsm8k as Hugging Face stores it: main/ and socratic/, the train split in two shards."""
    raw = tmp_path / "gsm8k"
    (raw / "main").mkdir(parents=True)
    (raw / "socratic").mkdir()
    shard0 = gsm8k_raw(5)
    shard1 = gsm8k_raw(4, start=5) + [{"question": "Big numbers?", "answer": "Lots.\n#### 1,250"},
                                      {"question": "No final answer", "answer": "I forgot the marker."}]
    write_parquet(raw / "main" / "train-00000-of-00002.parquet", shard0)
    write_parquet(raw / "main" / "train-00001-of-00002.parquet", shard1)
    write_parquet(raw / "main" / "test-00000-of-00001.parquet", gsm8k_raw(3, start=100))
    write_parquet(raw / "socratic" / "train-00000-of-00001.parquet", gsm8k_raw(2, start=50))
    out = tmp_path / "out"
    res = run_cli("gsm8k", "--input", raw, "--output", out)
    assert res.returncode == 0, res.stderr
    assert f"wrote {out / 'train.parquet'}: 10 rows, 1 skipped" in res.stdout
    train, test = read_rows(out / "train.parquet"), read_rows(out / "test.parquet")
    assert len(test) == 3 and test[0]["extra_info"]["split"] == "test"
    raws = shard0 + shard1[:-1]
    assert len(train) == len(raws)
    for i, (row, r) in enumerate(zip(train, raws)):
        assert row["data_source"] == "openai/gsm8k" and row["ability"] == "math"
        assert row["prompt"] == [{"role": "user", "content": r["question"] + " " + GSM8K_INSTRUCTION}]
        assert row["reward_model"] == {"style": "rule", "ground_truth": r["answer"].split("#### ")[1].replace(",", "")}
        assert row["extra_info"] == {"split": "train", "index": i, "answer": r["answer"], "question": r["question"]}
    assert train[-1]["reward_model"]["ground_truth"] == "1250"
    ps = load_prompts(out / "train.parquet", tokenizer=chat_tok, max_prompt_len=1024)
    assert [reward_fn_for(it.data_source)(r["answer"], it.ground_truth) for it, r in zip(ps, raws)] == [1.0] * 10


def test_preprocess_gsm8k_jsonl_folder_and_single_file(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    write_jsonl(raw / "train.jsonl", gsm8k_raw(6))
    write_jsonl(raw / "test.jsonl", gsm8k_raw(2, start=9))
    assert preprocess.main(["gsm8k", "--input", str(raw), "--output", str(tmp_path / "a"), "--format", "jsonl"]) == 0
    assert len(read_rows(tmp_path / "a" / "train.jsonl")) == 6 and len(read_rows(tmp_path / "a" / "test.jsonl")) == 2
    assert preprocess.main(["gsm8k", "--input", str(raw / "test.jsonl"), "--output", str(tmp_path / "b")]) == 0
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["test.parquet"]


def test_preprocess_math_lighteval_layout(tmp_path):
    raw = tmp_path / "math"
    (raw / "data").mkdir(parents=True)
    (raw / "algebra").mkdir()
    rows = [{"problem": r"What is $\frac{1}{4} + \frac{1}{4}$?", "level": "Level 1", "type": "Prealgebra",
             "solution": r"We add: $\frac{1}{4}+\frac{1}{4} = \boxed{\frac{1}{2}}$."},
            {"problem": "Solve $x + 2 = 5$.", "level": "Level 1", "type": "Algebra",
             "solution": r"First guess \boxed{2}; no: $x = \boxed{3}$."},
            {"problem": "A proof.", "level": "Level 5", "type": "Geometry", "solution": "No box here."}]
    write_parquet(raw / "data" / "train-00000-of-00001.parquet", rows)
    write_parquet(raw / "data" / "test-00000-of-00001.parquet", rows[:1])
    write_parquet(raw / "algebra" / "train-00000-of-00001.parquet", rows[1:2])
    out = tmp_path / "out"
    assert preprocess.main(["math", "--input", str(raw), "--output", str(out)]) == 0
    train = read_rows(out / "train.parquet")
    assert [r["reward_model"]["ground_truth"] for r in train] == [r"\frac{1}{2}", "3"]
    assert train[0]["data_source"] == "DigitalLearningGmbH/MATH-lighteval"
    assert train[0]["prompt"][0]["content"] == (rows[0]["problem"] + " Let's think step by step and output the "
                                                "final answer within \\boxed{}.")
    assert train[1]["extra_info"] == {"split": "train", "index": 1, "level": "Level 1", "type": "Algebra"}
    for row, r in zip(train, rows):
        assert math_reward(r["solution"], row["reward_model"]["ground_truth"]) == 1.0


def test_preprocess_bad_input_exits_2_with_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "two" / "a").mkdir(parents=True)
    (tmp_path / "two" / "b").mkdir()
    write_jsonl(tmp_path / "two" / "a" / "train.jsonl", gsm8k_raw(1))
    write_jsonl(tmp_path / "two" / "b" / "train.jsonl", gsm8k_raw(1))
    (tmp_path / "m").mkdir()
    write_jsonl(tmp_path / "m" / "train.jsonl", [{"problem": "p", "solution": r"\boxed{1}"}])
    (tmp_path / "n").mkdir()
    write_jsonl(tmp_path / "n" / "train.jsonl", [{"question": "q", "answer": "no marker"}])
    cases = [("gsm8k", tmp_path / "nope", "does not exist"),
             ("gsm8k", tmp_path / "empty", re.escape("holds no train*/test* files")),
             ("gsm8k", tmp_path / "two", re.escape("split files in 2 folders (a, b); pass one of them")),
             ("gsm8k", tmp_path / "m", "has no column 'question'"),
             ("math", tmp_path / "two", re.escape("split files in 2 folders")),
             ("gsm8k", tmp_path / "n", "no row of .* has a readable final answer")]
    for kind, path, message in cases:
        res = run_cli(kind, "--input", path, "--output", tmp_path / "out")
        assert res.returncode == 2, (path, res.stdout, res.stderr)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and re.search(message, lines[0]), lines


def test_preprocess_sample_command(tmp_path):
    res = run_cli("sample", "--output", tmp_path)
    assert res.returncode == 0, res.stderr
    for split in ("train", "test"):
        for suffix in (".parquet", ".jsonl"):
            assert read_rows(tmp_path / f"{split}{suffix}") == read_rows(sample_path(split, suffix=suffix))
