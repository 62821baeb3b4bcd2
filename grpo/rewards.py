"""Rule-based rewards for math GRPO: GSM8K `#### 42` answers and MATH `\\boxed{...}` answers.

Every reward takes the response text and the row's `reward_model.ground_truth` and returns a float (1.0 right,
0.0 wrong or unreadable). `reward_fn_for(data_source)` picks the function for a dataset row, with the data-source
names verl's preprocessing scripts write.

GSM8K has two scorers, chosen by `reward.gsm8k`:
- lenient (`gsm8k_reward`, the default): strict mode reads the number after the last `####`, flexible mode the
  last number of the response, and `format_score` is paid for a readable but wrong answer. The comparison is
  numeric (`1,200` == `1200`, `$1,200` == `1200`, `72.0` == `72`) and the whole response is searched.
- strict (`gsm8k_reward_verl`): verl's `reward_score/gsm8k.py` `compute_score` as its default reward manager
  calls it: only the last 300 characters are searched with verl's pattern `#### (-?[0-9.,]+)` (a `$` after
  `#### ` does not match), commas removed, the text compared with the ground truth as strings (`72.0` != `72`).

MATH reads the last `\\boxed{...}` (braces balanced; `\\fbox{}` and `\\boxed 5` too) and compares it with the ground
truth through math-verify (`parse` + `verify`), so `0.5`, `\\frac12` and `\\dfrac{1}{2}` are one answer.

Timeouts. A few answers make sympy run for minutes. math-verify's own timeouts use `signal.alarm` and raise
ValueError outside the main thread, so it is always called here with its timeouts off, under one deadline per call
of our own: in the main thread an ITIMER_REAL alarm (an alarm set by the caller, e.g. pytest-timeout, is put back
afterwards); in any other thread there is no deadline (Python can only interrupt the main thread), so a pathological
answer can hold that thread: score from the main thread or from worker processes when that matters. Any math-verify
error or timeout scores 0.
"""

from __future__ import annotations

import logging
import re
import signal
import threading
import time
from contextlib import contextmanager
from decimal import Decimal, InvalidOperation
from typing import Callable, Literal, Optional

GSM8K_SOURCES = ("openai/gsm8k", "gsm8k")
MATH_SOURCES = ("DigitalLearningGmbH/MATH-lighteval", "lighteval/MATH", "HuggingFaceH4/MATH-500", "math")

# A number as a response may write it: optional sign and dollar sign, digits with thousands commas, decimals.
_NUMBER = r"(?:-\$?|\$-?)?(?:\d[\d,]*(?:\.\d+)?|\.\d+)"
_STRICT = re.compile(r"####\s*(" + _NUMBER + r")")
_ANY_NUMBER = re.compile(_NUMBER)
_BOXED = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


# --- GSM8K ------------------------------------------------------------------------------------------------------

def extract_gsm8k_answer(response: str, *, method: Literal["strict", "flexible"] = "strict") -> Optional[str]:
    """The answer a response gives, as written (`$1,200`), or None.

    strict: the number after the last `#### ` (the format the GSM8K prompt asks for); flexible: the last number.
    """
    if method == "strict":
        found = _STRICT.findall(response)
    elif method == "flexible":
        found = _ANY_NUMBER.findall(response)
    else:
        raise ValueError(f"unknown GSM8K extraction method {method!r}; valid: 'strict', 'flexible'")
    return found[-1].strip() if found else None


def to_number(text: str) -> Optional[Decimal]:
    """`$1,200.` -> Decimal(1200); None when the text is not a plain number."""
    s = re.sub(r"[\s$,]", "", text).rstrip(".")
    if not re.fullmatch(r"-?(\d+(\.\d*)?|\.\d+)", s):
        return None
    try:
        return Decimal(s)
    except InvalidOperation:
        return None


def gsm8k_reward(response: str, ground_truth: str, *, method: Literal["strict", "flexible"] = "strict",
                 format_score: float = 0.0) -> float:
    """1.0 when the response's answer equals the ground truth as a number; `format_score` when the response gives
    an answer in the asked format that is wrong; 0.0 when it gives none (verl's scoring)."""
    answer = extract_gsm8k_answer(response, method=method)
    if answer is None:
        return 0.0
    want, got = to_number(str(ground_truth)), to_number(answer)
    if want is not None and got is not None:
        right = want == got
    else:  # a non-numeric ground truth: compare the texts without spaces, commas and dollar signs
        right = re.sub(r"[\s$,]", "", str(ground_truth)) == re.sub(r"[\s$,]", "", answer)
    return 1.0 if right else float(format_score)


_VERL_GSM8K = re.compile(r"#### (\-?[0-9\.\,]+)")
VERL_CLIP_CHARS = 300  # verl matches only the end of a response ("a safe approximation for 300 tokens")


def gsm8k_reward_verl(response: str, ground_truth: str) -> float:
    """verl's GSM8K score, bit for bit: 1.0 when the last `#### <number>` in the response's last 300 characters,
    commas and dollar signs removed, equals the ground truth as a string; else 0.0."""
    found = _VERL_GSM8K.findall(response[-VERL_CLIP_CHARS:])
    if not found:
        return 0.0
    return 1.0 if found[-1].replace(",", "").replace("$", "") == str(ground_truth) else 0.0


# --- MATH -------------------------------------------------------------------------------------------------------

def last_boxed(text: str) -> Optional[str]:
    """The content of the last `\\boxed{...}` or `\\fbox{...}` in `text`, with nested braces kept whole.

    `\\boxed 5` (a one-token argument) gives `5`. None when there is no box or the last one is not closed (a
    truncated response). Escaped braces `\\{ \\}` inside the box do not count.
    """
    matches = list(_BOXED.finditer(text))
    if not matches:
        return None
    i = matches[-1].end()
    while i < len(text) and text[i] == " ":
        i += 1
    if i >= len(text):
        return None
    if text[i] != "{":
        token = re.match(r"[^\s$]+", text[i:])
        return token.group(0) if token else None
    depth, start = 0, i + 1
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start:i].strip()
        i += 1
    return None


class _Deadline(BaseException):
    """Raised by our alarm. A BaseException, so math-verify's `except Exception` blocks let it through."""


@contextmanager
def _deadline(seconds: Optional[float]):
    """Raise _Deadline in the block after `seconds` (main thread only; elsewhere no limit, see the module doc)."""
    if not seconds or seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return
    outer_handler = signal.getsignal(signal.SIGALRM)
    outer_left, outer_interval = signal.getitimer(signal.ITIMER_REAL)
    start = time.monotonic()

    def on_alarm(signum, frame):
        raise _Deadline()

    signal.signal(signal.SIGALRM, on_alarm)
    # then again every 50 ms: sympy has bare `except:` blocks that can swallow one raise, and a single alarm lost
    # there left a scorer running for good (seen: a 10^9-term sum past its 0.5 s limit for minutes)
    signal.setitimer(signal.ITIMER_REAL, seconds, 0.05)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, outer_handler)
        if outer_left > 0:  # re-arm the caller's alarm; one that fell due meanwhile goes off right away
            signal.setitimer(signal.ITIMER_REAL, max(outer_left - (time.monotonic() - start), 1e-3), outer_interval)


class _DropTimeoutNotice(logging.Filter):
    """math-verify warns once that its timeouts are off; they are off on purpose here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


_math_verify = None


def _load_math_verify():
    global _math_verify
    if _math_verify is None:
        try:
            import math_verify
        except ImportError as e:
            raise ImportError("math_reward needs math-verify: pip install 'math-verify>=0.8,<1'") from e
        for name in ("math_verify.parser", "math_verify.grader"):
            logging.getLogger(name).addFilter(_DropTimeoutNotice())
        _math_verify = math_verify
    return _math_verify


def math_reward(response: str, ground_truth: str, *, timeout_s: float = 5.0) -> float:
    """1.0 when the last `\\boxed{}` of the response equals the ground truth by math-verify, else 0.0.

    The ground truth is the boxed content of a MATH solution (`\\frac{1}{2}`); a ground truth that is itself a
    `\\boxed{...}` works too. No box, a math-verify error or a run past `timeout_s` (main thread only) score 0.
    """
    answer = last_boxed(response)
    if answer is None:
        return 0.0
    gold_text = str(ground_truth)
    if _BOXED.search(gold_text):
        gold_text = last_boxed(gold_text) or gold_text
    mv = _load_math_verify()
    latex, expr = mv.LatexExtractionConfig(), mv.ExprExtractionConfig()
    try:
        with _deadline(timeout_s):
            gold = mv.parse("\\boxed{" + gold_text + "}", extraction_config=[latex], parsing_timeout=None)
            if not gold:  # math-verify cannot read the ground truth: exact text match is all that is left
                return float(re.sub(r"\s", "", gold_text) == re.sub(r"\s", "", answer))
            pred = mv.parse("\\boxed{" + answer + "}", extraction_config=[latex, expr], parsing_timeout=None)
            return 1.0 if pred and mv.verify(gold, pred, timeout_seconds=None) else 0.0
    except (Exception, _Deadline):
        return 0.0


# --- format and dispatch ----------------------------------------------------------------------------------------

def format_reward(response: str, *, style: Literal["gsm8k", "math"]) -> float:
    """1.0 when the response ends its work in the asked format (`#### <number>` or a closed `\\boxed{}`), else 0.0.
    A shaping term to add to the answer reward with a small weight; it says nothing about correctness."""
    if style == "gsm8k":
        return float(extract_gsm8k_answer(response, method="strict") is not None)
    if style == "math":
        return float(last_boxed(response) is not None)
    raise ValueError(f"unknown format style {style!r}; valid: 'gsm8k', 'math'")


RewardFn = Callable[[str, str], float]
_REWARDS: dict[str, RewardFn] = {
    **{s: gsm8k_reward for s in GSM8K_SOURCES},
    **{s: math_reward for s in MATH_SOURCES},
}


GSM8K_SCORERS = {"lenient": gsm8k_reward, "strict": gsm8k_reward_verl}


def known_data_sources() -> list[str]:
    """The data sources with a built-in scorer."""
    return sorted(_REWARDS)


def reward_fn_for(data_source: str, *, gsm8k: str = "lenient") -> RewardFn:
    """The reward function `fn(response, ground_truth) -> float` for a row's `data_source`; `gsm8k` picks the GSM8K
    scorer ("lenient" or "strict", verl's)."""
    if data_source not in _REWARDS:
        raise ValueError(f"no reward function for data_source {data_source!r}; known data sources: "
                         f"{', '.join(sorted(_REWARDS))}; or score it with your own function: "
                         "reward.function=path/to/file.py:compute_score")
    if data_source in GSM8K_SOURCES:
        if gsm8k not in GSM8K_SCORERS:
            raise ValueError(f"unknown GSM8K scorer {gsm8k!r}; valid: {', '.join(GSM8K_SCORERS)}")
        return GSM8K_SCORERS[gsm8k]
    return _REWARDS[data_source]


def default_compute_score(data_source: str, solution_str: str, ground_truth: str, extra_info=None, *,
                          gsm8k: str = "lenient") -> float:
    """The built-in scorers behind verl's reward-function signature: a plug-in can fall back to them."""
    return reward_fn_for(data_source, gsm8k=gsm8k)(solution_str, ground_truth)
