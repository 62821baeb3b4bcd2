"""Prompt datasets for math GRPO, in verl's GSM8K/MATH layout, from parquet or jsonl files.

A row (what `python -m grpo.preprocess` writes, and what verl's `examples/data_preprocess/gsm8k.py` and
`math_dataset.py` write):

    prompt        [{"role": "user", "content": "<question> Let's think step by step ..."}]  (a plain string is
                  read as one user message)
    reward_model  {"style": "rule", "ground_truth": "42"}
    data_source   "openai/gsm8k" | "DigitalLearningGmbH/MATH-lighteval" | ...  (picks the reward: grpo.rewards)
    extra_info    {"split": "train", "index": 0, ...}  (optional; passed to the reward function)

`load_prompts` applies the tokenizer's chat template with the generation prompt, drops prompts longer than
`max_prompt_len` tokens and returns a `PromptSet`; `PromptSet.batches()` draws batches in a seeded shuffled order,
epoch after epoch, with a state to save in checkpoints and restore on resume.
"""

from __future__ import annotations

import glob
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

SUFFIXES = (".parquet", ".jsonl")
SAMPLE_DIR = Path(__file__).parent / "sample_data"
LAYOUT_HINT = ("expected verl's layout: prompt = [{'role': 'user', 'content': ...}], "
               "reward_model = {'style': 'rule', 'ground_truth': ...}, data_source; "
               "`python -m grpo.preprocess` converts the raw GSM8K and MATH files")


# --- tokenizer --------------------------------------------------------------------------------------------------

# the classes transformers writes for a tokenizer that is a plain `tokenizers` model (no model-specific Python class)
PLAIN_TOKENIZER_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")


def load_pretrained_tokenizer(path):
    """The tokenizer of a Hugging Face folder. A plain `tokenizers` tokenizer saved beside a model config loads as
    itself: transformers 5's AutoTokenizer would take the model type's class (Qwen2Tokenizer, byte-level), which
    silently encodes a word-level vocabulary to nothing."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(path).expanduser()
    config = path / "tokenizer_config.json"
    declared = json.loads(config.read_text()).get("tokenizer_class") if config.is_file() else None
    if declared in PLAIN_TOKENIZER_CLASSES and (path / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(str(path))
    return AutoTokenizer.from_pretrained(str(path))


# --- files ------------------------------------------------------------------------------------------------------

def _check_suffix(path: Path) -> None:
    if path.suffix not in SUFFIXES:
        raise ValueError(f"dataset {path} has suffix {path.suffix!r}; readable suffixes: {', '.join(SUFFIXES)}")


def read_dataset(path: str | Path) -> tuple[list[str], list[dict[str, Any]]]:
    """Column names and rows of a .parquet or .jsonl file. Rows are dicts (nested structs and lists as Python dicts
    and lists); the columns of a jsonl file are the keys of its rows, in the order first seen."""
    path = Path(path)
    _check_suffix(path)
    if not path.is_file():
        raise ValueError(f"dataset {path} does not exist")
    if path.suffix == ".parquet":
        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as e:
            raise ValueError(f"dataset {path} is not a readable parquet file: {e}") from e
        return list(table.column_names), table.to_pylist()
    rows, columns = [], {}
    with open(path, encoding="utf-8") as f:
        for num, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"dataset {path} line {num} is not valid JSON ({e.msg}); each line must be "
                                 "one JSON object") from e
            if not isinstance(row, dict):
                raise ValueError(f"dataset {path} line {num} is a JSON {type(row).__name__}, not an object")
            rows.append(row)
            columns.update(dict.fromkeys(row))
    return list(columns), rows


def expand_paths(spec: str | Path) -> list[Path]:
    """The files a `data.train_path` names: one path, a comma-separated list, or globs (`data/*.parquet`), each
    glob sorted by name so every process and every resume sees one order. A glob that matches nothing is an error."""
    if isinstance(spec, Path):
        return [spec]
    paths: list[Path] = []
    for part in (p.strip() for p in str(spec).split(",")):
        if not part:
            continue
        part = str(Path(part).expanduser())
        if glob.has_magic(part):
            found = sorted(glob.glob(part))
            if not found:
                raise ValueError(f"dataset pattern {part} matches no file")
            paths += [Path(f) for f in found]
        else:
            paths.append(Path(part))
    if not paths:
        raise ValueError(f"no dataset file named in {str(spec)!r}")
    return paths


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Every row of a .parquet or .jsonl file as a dict."""
    return read_dataset(path)[1]


def write_rows(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """Write rows as parquet (nested columns as structs and lists) or jsonl, by the path's suffix."""
    path = Path(path)
    _check_suffix(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        with open(path, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


def sample_path(split: str = "train", *, suffix: str = ".parquet") -> Path:
    """The built-in GSM8K-style sample shipped with the package (`grpo/sample_data/{train,test}.{parquet,jsonl}`)."""
    if split not in ("train", "test") or suffix not in SUFFIXES:
        raise ValueError(f"the sample has splits 'train', 'test' and suffixes {', '.join(SUFFIXES)}; "
                         f"got {split!r}, {suffix!r}")
    return SAMPLE_DIR / f"{split}{suffix}"


# --- prompts ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PromptItem:
    prompt_ids: list[int]  # the chat-templated prompt, generation prompt included
    ground_truth: str
    data_source: str
    text: str  # the prompt as the model sees it (the templated text)
    extra_info: dict | None = None  # the row's extra_info, handed to a reward function as verl does


def _messages(value: Any, where: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, (list, tuple)) and value and all(
            isinstance(m, dict) and isinstance(m.get("content"), str) for m in value):
        return [{"role": m.get("role") or "user", "content": m["content"]} for m in value]
    raise ValueError(f"{where}: 'prompt' is {str(value)[:80]!r}; {LAYOUT_HINT}")


def _ground_truth(value: Any, where: str) -> str:
    if isinstance(value, dict) and value.get("ground_truth") is not None:
        return str(value["ground_truth"])
    raise ValueError(f"{where}: 'reward_model' is {str(value)[:80]!r}, with no 'ground_truth'; {LAYOUT_HINT}")


def render_prompts(tokenizer, conversations: list[list[dict[str, str]]]) -> tuple[list[str], list[list[int]]]:
    """Texts and token ids of the prompts as the policy sees them.

    With a chat template: `apply_chat_template(messages, add_generation_prompt=True)`; the ids are the rendered text
    encoded without added special tokens, which is what `apply_chat_template(..., tokenize=True)` does (a test
    checks they agree), done in one batched call. Without a chat template (base models, the tiny test tokenizer):
    the message contents joined by newlines, encoded with the tokenizer's own special tokens (BOS where it adds one).
    """
    if getattr(tokenizer, "chat_template", None):
        texts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]
        return texts, list(tokenizer(texts, add_special_tokens=False)["input_ids"])
    texts = ["\n".join(m["content"] for m in c) for c in conversations]
    return texts, list(tokenizer(texts)["input_ids"])


def load_prompts(path: str | Path, *, tokenizer, max_prompt_len: int,
                 required: Sequence[str] = ("prompt", "reward_model")) -> "PromptSet":
    """Read a prompt dataset (.parquet or .jsonl, or several: `expand_paths`) in verl's layout and tokenize it for
    the policy. Several files are one prompt set, in file order (the batches shuffle across all of them).

    Prompts longer than `max_prompt_len` tokens are dropped (`PromptSet.num_dropped`, `PromptSet.report`); it is
    an error when all are. A row with no `data_source` gets "" (and `grpo.rewards.reward_fn_for` will refuse it).
    """
    paths = expand_paths(path)
    path = paths[0] if len(paths) == 1 else f"{len(paths)} files ({', '.join(p.name for p in paths)})"
    conversations, truths, sources, extras = [], [], [], []
    for file in paths:
        columns, rows = read_dataset(file)
        if not rows:
            raise ValueError(f"dataset {file} has no rows")
        for col in required:
            if col not in columns:
                raise ValueError(f"dataset {file} has no column {col!r} (columns: {', '.join(columns) or 'none'}); "
                                 f"{LAYOUT_HINT}")
        for i, row in enumerate(rows):
            where = f"dataset {file} row {i}"
            conversations.append(_messages(row.get("prompt"), where))
            truths.append(_ground_truth(row.get("reward_model"), where))
            sources.append(str(row.get("data_source") or ""))
            extras.append(row.get("extra_info") if isinstance(row.get("extra_info"), dict) else None)
    texts, ids = render_prompts(tokenizer, conversations)
    items = [PromptItem(prompt_ids=list(x), ground_truth=t, data_source=s, text=txt, extra_info=e)
             for x, t, s, txt, e in zip(ids, truths, sources, texts, extras) if len(x) <= max_prompt_len]
    if not items:
        raise ValueError(f"all {len(conversations)} prompts of {path} are longer than data.max_prompt_len="
                         f"{max_prompt_len} tokens (shortest: {min(len(x) for x in ids)}); raise it")
    return PromptSet(items, source=str(path), num_dropped=len(conversations) - len(items),
                     max_prompt_len=max_prompt_len)


class PromptSet(Sequence[PromptItem]):
    """The prompts of one dataset file, tokenized, in file order; `batches()` draws them for training."""

    def __init__(self, items: list[PromptItem], *, source: str = "", num_dropped: int = 0,
                 max_prompt_len: int | None = None):
        self.items = list(items)
        self.source = source
        self.num_dropped = num_dropped
        longest = max((len(it.prompt_ids) for it in self.items), default=0)
        self.report = (f"{source}: {len(self.items)} prompts (longest {longest} tokens), {num_dropped} dropped as "
                       f"longer than data.max_prompt_len={max_prompt_len} tokens")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]

    @property
    def data_sources(self) -> list[str]:
        """The distinct data sources, sorted: check each with `grpo.rewards.reward_fn_for` before training."""
        return sorted({it.data_source for it in self.items})

    def batches(self, *, batch_size: int, seed: int = 0) -> "PromptBatches":
        return PromptBatches(self.items, batch_size=batch_size, seed=seed)


class PromptBatches(Iterator[list[PromptItem]]):
    """Endless batches of `batch_size` prompts: each epoch is a fresh permutation seeded by (seed, epoch), cut into
    `len // batch_size` batches; the remainder of an epoch is skipped (verl's drop_last), and other prompts are
    left over in the next epoch's permutation.

    The state is (epoch, position): the next batch starts at `position` of epoch `epoch`'s permutation.
    `state_dict()` after step k, restored with `load_state_dict()`, continues with the batch of step k + 1.
    """

    def __init__(self, items: Sequence[PromptItem], *, batch_size: int, seed: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {batch_size}")
        if batch_size > len(items):
            raise ValueError(f"batch size {batch_size} is larger than the dataset ({len(items)} prompts); lower "
                             "data.prompts_per_step or use a larger dataset")
        self.items, self.batch_size, self.seed = items, batch_size, seed
        self.epoch, self.position = 0, 0
        self._order_epoch, self._order = -1, []

    @property
    def batches_per_epoch(self) -> int:
        return len(self.items) // self.batch_size

    def order(self, epoch: int) -> list[int]:
        """The permutation of item indices for an epoch; the same on every process and Python version."""
        if epoch != self._order_epoch:
            self._order = list(range(len(self.items)))
            random.Random(f"grpo.data:{self.seed}:{epoch}").shuffle(self._order)
            self._order_epoch = epoch
        return self._order

    def __next__(self) -> list[PromptItem]:
        if self.position + self.batch_size > len(self.items):
            self.epoch, self.position = self.epoch + 1, 0
        order = self.order(self.epoch)
        batch = [self.items[i] for i in order[self.position:self.position + self.batch_size]]
        self.position += self.batch_size
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "batch_size": self.batch_size,
                "num_prompts": len(self.items)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue where `state` left off. The dataset, batch size and seed must be the ones it was saved with."""
        mine = self.state_dict()
        for key in ("num_prompts", "batch_size", "seed"):
            if state.get(key) != mine[key]:
                raise ValueError(f"cannot resume the prompt order: it was saved with {key}={state.get(key)}, this "
                                 f"run has {key}={mine[key]}; resume with the same dataset, data.max_prompt_len, "
                                 "data.prompts_per_step and train.seed")
        epoch, position = int(state["epoch"]), int(state["position"])
        assert epoch >= 0 and 0 <= position <= len(self.items), state
        self.epoch, self.position = epoch, position
