"""Turn the public GSM8K and MATH files into prompt datasets in verl's layout (see grpo.data).

    python -m grpo.preprocess gsm8k  --input DIR_OR_FILE --output DIR
    python -m grpo.preprocess math   --input DIR_OR_FILE --output DIR
    python -m grpo.preprocess sample --output DIR

`--input` is a downloaded copy of the dataset (nothing is downloaded here): a folder holding `train*` and `test*`
files (.parquet or .jsonl; shards such as `train-00000-of-00002.parquet` are joined in name order), or one such
file. Hugging Face's `openai/gsm8k` keeps two configs side by side (`main/`, `socratic/`): `main` is taken;
`DigitalLearningGmbH/MATH-lighteval` keeps every subject beside `data/`: `data` is taken. Point `--input` at a
subfolder to choose another.

Raw layouts: GSM8K rows have `question` and `answer` (the worked solution, ending `#### 42`); MATH rows have
`problem` and `solution` (the answer in the last `\\boxed{}`), plus `level` and `type`. The prompt is the question
followed by the instruction verl's scripts append; the ground truth is the final answer (GSM8K: commas removed).
Rows whose answer cannot be read are skipped and counted. Writes `train.parquet` and `test.parquet` (or the one
split the input has). `sample` writes the built-in GSM8K-style sample (grpo/sample_data; problems written for this
project, not taken from GSM8K). Bad input: one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import random
import re
import sys
from pathlib import Path
from typing import Any, Callable, Optional

from grpo.data import SUFFIXES, read_dataset, write_rows
from grpo.rewards import last_boxed

GSM8K_SOURCE = "openai/gsm8k"
MATH_SOURCE = "DigitalLearningGmbH/MATH-lighteval"
GSM8K_INSTRUCTION = 'Let\'s think step by step and output the final answer after "####".'
MATH_INSTRUCTION = "Let's think step by step and output the final answer within \\boxed{}."
_GSM8K_FINAL = re.compile(r"####\s*\$?\s*(-?[0-9.,]*[0-9])")


def gsm8k_row(raw: dict[str, Any], *, split: str, index: int) -> Optional[dict[str, Any]]:
    """One GSM8K row in verl's layout, or None when the answer has no `#### <number>`."""
    if not isinstance(raw.get("question"), str) or not isinstance(raw.get("answer"), str):
        return None
    found = _GSM8K_FINAL.findall(raw["answer"])
    if not found:
        return None
    return {
        "data_source": GSM8K_SOURCE,
        "prompt": [{"role": "user", "content": f"{raw['question']} {GSM8K_INSTRUCTION}"}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": found[-1].replace(",", "")},
        "extra_info": {"split": split, "index": index, "answer": raw["answer"], "question": raw["question"]},
    }


def math_row(raw: dict[str, Any], *, split: str, index: int) -> Optional[dict[str, Any]]:
    """One MATH row in verl's layout, or None when the solution has no closed `\\boxed{}`."""
    if not isinstance(raw.get("problem"), str) or not isinstance(raw.get("solution"), str):
        return None
    answer = last_boxed(raw["solution"])
    if not answer:
        return None
    return {
        "data_source": MATH_SOURCE,
        "prompt": [{"role": "user", "content": f"{raw['problem']} {MATH_INSTRUCTION}"}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": answer},
        "extra_info": {"split": split, "index": index, "level": raw.get("level"), "type": raw.get("type")},
    }


DATASETS: dict[str, tuple[Callable, tuple[str, ...], tuple[str, ...]]] = {
    # name: (row converter, raw columns, preferred subfolders)
    "gsm8k": (gsm8k_row, ("question", "answer"), ("main",)),
    "math": (math_row, ("problem", "solution"), ("data", "default")),
}


def split_of(name: str) -> Optional[str]:
    for split in ("train", "test"):
        if name.startswith(split):
            return split
    return None


def find_split_files(path: Path, *, prefer: tuple[str, ...] = ()) -> dict[str, list[Path]]:
    """{"train": [files...], "test": [...]} from a file or a folder (see the module doc for the rules)."""
    if not path.exists():
        raise ValueError(f"--input {path} does not exist")
    if path.is_file():
        if path.suffix not in SUFFIXES:
            raise ValueError(f"--input {path} has suffix {path.suffix!r}; readable suffixes: {', '.join(SUFFIXES)}")
        return {"test" if "test" in path.name else "train": [path]}
    found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES and split_of(p.name))
    if not found:
        raise ValueError(f"--input {path} holds no train*/test* files with suffix {' or '.join(SUFFIXES)}")
    folders = sorted({p.parent for p in found})
    if len(folders) > 1:
        preferred = [f for f in folders if f.name in prefer]
        if len(preferred) != 1:
            raise ValueError(f"--input {path} has split files in {len(folders)} folders "
                             f"({', '.join(str(f.relative_to(path)) for f in folders[:6])}); pass one of them")
        found = [p for p in found if p.parent == preferred[0]]
    splits: dict[str, list[Path]] = {}
    for p in found:
        splits.setdefault(split_of(p.name), []).append(p)
    for split, files in splits.items():
        suffixes = {p.suffix for p in files}
        if len(suffixes) > 1:  # e.g. train.jsonl beside train.parquet: the same split twice
            raise ValueError(f"--input {path} has the {split} split in several formats ({', '.join(map(str, files))});"
                             " keep one")
    return splits


def convert(kind: str, input_path: Path, output_dir: Path, *, suffix: str = ".parquet") -> list[str]:
    """Convert a raw dataset; returns one report line per split written."""
    to_row, needed, prefer = DATASETS[kind]
    lines = []
    for split, files in sorted(find_split_files(input_path, prefer=prefer).items(), key=lambda kv: kv[0] != "train"):
        raw_rows: list[dict[str, Any]] = []
        for f in files:
            columns, rows = read_dataset(f)
            missing = [c for c in needed if c not in columns]
            if missing:
                raise ValueError(f"{f} has no column {missing[0]!r} (columns: {', '.join(columns) or 'none'}); the "
                                 f"raw {kind} layout has {', '.join(needed)}")
            raw_rows += rows
        out = [r for i, raw in enumerate(raw_rows) if (r := to_row(raw, split=split, index=i)) is not None]
        if not out:
            raise ValueError(f"no row of {', '.join(map(str, files))} has a readable final answer; is it {kind}?")
        target = output_dir / f"{split}{suffix}"
        write_rows(target, out)
        lines.append(f"wrote {target}: {len(out)} rows, {len(raw_rows) - len(out)} skipped (no readable answer)")
    return lines


# --- the built-in sample ----------------------------------------------------------------------------------------

def _problems(rng: random.Random) -> list[Callable[[], tuple[str, str]]]:
    """Word-problem templates written for this project. Each returns (question, worked answer ending `#### N`)."""
    r = rng.randint

    def muffins():
        a, b, c = r(3, 9), r(6, 12), r(5, 20)
        t = a * b
        return (f"Mara bakes {a} trays of rolls with {b} rolls on each tray. She gives {c} rolls to her neighbors. "
                "How many rolls does she have left?",
                f"Mara bakes {a} * {b} = <<{a}*{b}={t}>>{t} rolls.\nShe has {t} - {c} = <<{t}-{c}={t - c}>>{t - c} "
                f"rolls left.\n#### {t - c}")

    def bikes():
        a, b, c = r(20, 60), r(3, 15), r(5, 25)
        return (f"A bike shop has {a} bicycles. It sells {b} on Monday and receives a delivery of {c} on Tuesday. "
                "How many bicycles does the shop have now?",
                f"After Monday the shop has {a} - {b} = <<{a}-{b}={a - b}>>{a - b} bicycles.\nAfter the delivery it "
                f"has {a - b} + {c} = <<{a - b}+{c}={a - b + c}>>{a - b + c} bicycles.\n#### {a - b + c}")

    def pages():
        a, b, w = r(10, 30), r(20, 50), r(2, 4)
        week = 5 * a + 2 * b
        return (f"Theo reads {a} pages on every weekday and {b} pages on each day of the weekend. How many pages "
                f"does he read in {w} weeks?",
                f"On weekdays he reads 5 * {a} = <<5*{a}={5 * a}>>{5 * a} pages a week.\nOn the weekend he reads "
                f"2 * {b} = <<2*{b}={2 * b}>>{2 * b} pages.\nA week is {5 * a} + {2 * b} = <<{5 * a}+{2 * b}={week}>>"
                f"{week} pages, so {w} weeks are {week} * {w} = <<{week}*{w}={week * w}>>{week * w} pages.\n"
                f"#### {week * w}")

    def pencils():
        c, m, b = r(3, 8), r(2, 6), r(10, 24)
        a, each = c * m, m * b
        return (f"A school orders {a} boxes of pencils with {b} pencils in each box and shares them equally among "
                f"{c} classrooms. How many pencils does each classroom get?",
                f"The school gets {a} * {b} = <<{a}*{b}={a * b}>>{a * b} pencils.\nEach classroom gets {a * b} / {c}"
                f" = <<{a * b}/{c}={each}>>{each} pencils.\n#### {each}")

    def tomatoes():
        a, b, c = r(8, 16), r(9, 15), r(6, 12)
        return (f"A gardener plants {a} rows of tomato plants with {b} plants in each row. Every plant gives {c} "
                "tomatoes. How many tomatoes does the garden give?",
                f"There are {a} * {b} = <<{a}*{b}={a * b}>>{a * b} plants.\nThey give {a * b} * {c} = "
                f"<<{a * b}*{c}={a * b * c}>>{a * b * c} tomatoes.\n#### {a * b * c}")

    def wages():
        a, b = r(12, 25), r(15, 40)
        c = r(50, a * b - 20)
        return (f"Lena earns ${a} an hour and works {b} hours a week. She spends ${c} of her weekly pay on "
                "groceries. How many dollars of that week's pay are left?",
                f"She earns {a} * {b} = $<<{a}*{b}={a * b}>>{a * b}.\nShe has {a * b} - {c} = "
                f"$<<{a * b}-{c}={a * b - c}>>{a * b - c} left.\n#### {a * b - c}")

    def train():
        a, b, c, d = r(40, 80), r(2, 4), r(30, 60), r(2, 3)
        return (f"A train runs at {a} miles per hour for {b} hours, then at {c} miles per hour for {d} hours. How "
                "many miles does it travel in all?",
                f"First part: {a} * {b} = <<{a}*{b}={a * b}>>{a * b} miles.\nSecond part: {c} * {d} = "
                f"<<{c}*{d}={c * d}>>{c * d} miles.\nIn all {a * b} + {c * d} = <<{a * b}+{c * d}={a * b + c * d}>>"
                f"{a * b + c * d} miles.\n#### {a * b + c * d}")

    def marbles():
        m = r(3, 12)
        a = 6 * m
        return (f"A jar holds {a} marbles. A third of them are red and half of the others are blue. How many "
                "marbles are neither red nor blue?",
                f"Red: {a} / 3 = <<{a}/3={2 * m}>>{2 * m}.\nThe others: {a} - {2 * m} = <<{a}-{2 * m}={4 * m}>>"
                f"{4 * m}; half of them, {2 * m}, are blue.\nNeither: {4 * m} - {2 * m} = <<{4 * m}-{2 * m}={2 * m}>>"
                f"{2 * m}.\n#### {2 * m}")

    def tickets():
        a, b, c = r(8, 14), r(3, 6), r(3, 6)
        total = c * (a + b)
        paid = (total // 20 + 1) * 20
        return (f"A movie ticket costs ${a} and a snack costs ${b}. A family of {c} buys a ticket and a snack for "
                f"each person and pays with {paid // 20} twenty-dollar bills. How many dollars of change do they "
                "get?",
                f"Each person costs {a} + {b} = $<<{a}+{b}={a + b}>>{a + b}.\nThe family pays {c} * {a + b} = "
                f"$<<{c}*{a + b}={total}>>{total}.\nThey hand over {paid // 20} * 20 = $<<{paid // 20}*20={paid}>>"
                f"{paid}, so the change is {paid} - {total} = $<<{paid}-{total}={paid - total}>>{paid - total}.\n"
                f"#### {paid - total}")

    def tank():
        b, m = r(4, 12), r(5, 15)
        a = 2 * b * m
        return (f"A water tank holds {a} liters and a hose fills it at {b} liters per minute. The tank is half "
                "full. How many minutes does the hose need to fill it?",
                f"Half the tank is {a} / 2 = <<{a}/2={a // 2}>>{a // 2} liters.\nThe hose needs {a // 2} / {b} = "
                f"<<{a // 2}/{b}={m}>>{m} minutes.\n#### {m}")

    def stickers():
        a, b, c, d = r(30, 80), r(5, 20), r(2, 5), r(6, 12)
        return (f"Omar has {a} stickers. He gives {b} to his sister, then buys {c} packs of {d} stickers. How "
                "many stickers does he have now?",
                f"After giving some away he has {a} - {b} = <<{a}-{b}={a - b}>>{a - b}.\nThe packs hold {c} * {d} = "
                f"<<{c}*{d}={c * d}>>{c * d}.\nHe has {a - b} + {c * d} = <<{a - b}+{c * d}={a - b + c * d}>>"
                f"{a - b + c * d} stickers.\n#### {a - b + c * d}")

    def fence():
        a, b, c = r(10, 40), r(8, 30), r(6, 15)
        p = 2 * (a + b)
        return (f"A garden is {a} meters long and {b} meters wide. A fence goes all around it, and each meter of "
                f"fence costs ${c}. How many dollars does the fence cost?",
                f"The fence is 2 * ({a} + {b}) = <<2*({a}+{b})={p}>>{p} meters long.\nIt costs {p} * {c} = "
                f"$<<{p}*{c}={p * c}>>{p * c}.\n#### {p * c}")

    def cookies():
        a, c = r(2, 4), r(2, 5)
        b = 12 * a - r(3, 8)
        save = (12 * a - b) * c
        return (f"A bakery sells cookies for ${a} each or ${b} for a dozen. How many dollars does Priya save by "
                f"buying {c} dozen cookies instead of {12 * c} single cookies?",
                f"A dozen single cookies cost 12 * {a} = $<<12*{a}={12 * a}>>{12 * a}, so each dozen saves "
                f"{12 * a} - {b} = $<<{12 * a}-{b}={12 * a - b}>>{12 * a - b}.\nFor {c} dozen she saves "
                f"{12 * a - b} * {c} = $<<{12 * a - b}*{c}={save}>>{save}.\n#### {save}")

    def library():
        a, b, c = r(200, 600), r(20, 90), r(10, 60)
        a -= (a + b - c) % 4  # a quarter must be a whole number of books
        total = a + b - c
        left = total * 3 // 4
        return (f"A library has {a} books. It buys {b} new books and removes {c} old ones. Then a quarter of its "
                "books are lent out. How many books are still in the library?",
                f"It has {a} + {b} - {c} = <<{a}+{b}-{c}={total}>>{total} books.\nA quarter is {total} / 4 = "
                f"<<{total}/4={total // 4}>>{total // 4}, so {total} - {total // 4} = <<{total}-{total // 4}={left}>>"
                f"{left} remain.\n#### {left}")

    def laps():
        a, b = r(4, 15), rng.choice([200, 250, 400])
        km = a * b / 1000
        km_text = f"{km:g}"
        return (f"Sam runs {a} laps of a track that is {b} meters long. How many kilometers does he run?",
                f"He runs {a} * {b} = <<{a}*{b}={a * b}>>{a * b} meters.\nThat is {a * b} / 1000 = "
                f"<<{a * b}/1000={km_text}>>{km_text} kilometers.\n#### {km_text}")

    def temperature():
        a, b = r(5, 15), r(2, 14)
        return (f"At 6 a.m. the temperature was {a} degrees below zero. By noon it had risen {b} degrees. What was "
                "the temperature at noon, in degrees?",
                f"Below zero is negative: -{a} + {b} = <<-{a}+{b}={b - a}>>{b - a} degrees.\n#### {b - a}")

    return [muffins, bikes, pages, pencils, tomatoes, wages, train, marbles, tickets, tank, stickers, fence,
            cookies, library, laps, temperature]


def sample_raw(*, seed: int = 2026, per_template: int = 4) -> list[dict[str, str]]:
    """The built-in sample in GSM8K's raw layout: 16 templates x 4 = 64 problems, seeded, in a shuffled order."""
    rng = random.Random(seed)
    rows, seen = [], set()
    for make in _problems(rng):
        made = 0
        while made < per_template:  # redraw a repeated question
            question, answer = make()
            if question not in seen:
                seen.add(question)
                rows.append({"question": question, "answer": answer})
                made += 1
    rng.shuffle(rows)
    return rows


SAMPLE_TEST = 8  # the last 8 problems form the test split


def sample_rows() -> dict[str, list[dict[str, Any]]]:
    """The built-in sample in verl's layout: {"train": 56 rows, "test": 8 rows}."""
    raw = sample_raw()
    parts = {"train": raw[:-SAMPLE_TEST], "test": raw[-SAMPLE_TEST:]}
    return {split: [gsm8k_row(r, split=split, index=i) for i, r in enumerate(rows)] for split, rows in parts.items()}


def write_sample(output_dir: Path) -> list[str]:
    lines = []
    for split, rows in sample_rows().items():
        for suffix in SUFFIXES:
            write_rows(output_dir / f"{split}{suffix}", rows)
        lines.append(f"wrote {output_dir}/{split}.{{parquet,jsonl}}: {len(rows)} rows")
    return lines


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m grpo.preprocess", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="kind", required=True)
    for kind in DATASETS:
        p = sub.add_parser(kind, help=f"convert the raw {kind} files")
        p.add_argument("--input", required=True, type=Path, help="a folder with train*/test* files, or one file")
        p.add_argument("--output", required=True, type=Path, help="folder for train.parquet and test.parquet")
        p.add_argument("--format", choices=("parquet", "jsonl"), default="parquet")
    p = sub.add_parser("sample", help="write the built-in GSM8K-style sample (64 problems)")
    p.add_argument("--output", required=True, type=Path)
    args = parser.parse_args(argv)
    try:
        if args.kind == "sample":
            lines = write_sample(args.output)
        else:
            lines = convert(args.kind, args.input, args.output, suffix=f".{args.format}")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
