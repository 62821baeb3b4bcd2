"""Rewards for math GRPO: GSM8K `####` extraction and numeric comparison, MATH `\\boxed{}` extraction and
math-verify comparison (equivalent forms, failures, timeouts, worker threads), format rewards, dispatch."""

import random
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction

import pytest

from grpo.rewards import (GSM8K_SOURCES, MATH_SOURCES, extract_gsm8k_answer, format_reward, gsm8k_reward,
                          last_boxed, math_reward, reward_fn_for, to_number)

# ---------------------------------------------------------------- GSM8K


@pytest.mark.parametrize("response, truth, want", [
    ("3 * 4 = 12 apples.\n#### 12", "12", 1.0),
    ("#### 1,200", "1200", 1.0),  # thousands commas
    ("#### 1200", "1,200", 1.0),  # ... on either side
    ("#### $1,200.00", "1200", 1.0),  # dollar sign and zero decimals
    ("#### 12.0", "12", 1.0),
    ("#### 42.", "42", 1.0),  # the sentence's full stop
    ("#### -7", "-7", 1.0),
    ("#### -$7", "-7", 1.0),
    ("#### 7", "-7", 0.0),  # the sign matters
    ("#### 0.5", ".5", 1.0),
    ("#### 2.5", "2.50", 1.0),
    ("#### 2.51", "2.5", 0.0),
    ("####12", "12", 1.0),  # no space after ####
    ("first #### 5, then on reflection #### 6", "6", 1.0),  # the last #### wins
    ("first #### 5, then on reflection #### 6", "5", 0.0),
    ("The answer is 12.", "12", 0.0),  # strict: no #### means no answer
    ("#### twelve", "12", 0.0),
    ("", "12", 0.0),
    ("#### 123", "12", 0.0),
])
def test_gsm8k_strict(response, truth, want):
    assert gsm8k_reward(response, truth) == want


@pytest.mark.parametrize("response, truth, want", [
    ("3 apples and 4 pears make 7.", "7", 1.0),
    ("It was -3 degrees at noon", "-3", 1.0),
    ("In total $1,000.", "1000", 1.0),
    ("12 then 13", "12", 0.0),  # the last number, not the first
    ("#### 8", "8", 1.0),
    ("no digits at all", "8", 0.0),
])
def test_gsm8k_flexible(response, truth, want):
    assert gsm8k_reward(response, truth, method="flexible") == want


def test_gsm8k_format_score_pays_a_readable_wrong_answer_only():
    assert gsm8k_reward("#### 5", "6", format_score=0.1) == 0.1
    assert gsm8k_reward("the answer is 5", "6", format_score=0.1) == 0.0
    assert gsm8k_reward("#### 6", "6", format_score=0.1) == 1.0


def test_gsm8k_numbers_in_many_spellings_against_fractions():
    """Random integers and decimals written as a model might; the reference is exact rational arithmetic."""
    rng = random.Random(0)
    for _ in range(300):
        value = Fraction(rng.randint(-10**7, 10**7), rng.choice([1, 1, 10, 100]))
        plain = f"{float(value):.2f}".rstrip("0").rstrip(".") if value.denominator > 1 else str(value.numerator)
        spellings = [plain, f"{float(value):,.2f}", f"{float(value):.3f}"]
        if value.denominator == 1:
            spellings += [f"{value.numerator:,}", f"{value.numerator}.0", f"{value.numerator}."]
        if value >= 0:
            spellings.append(f"${float(value):,.2f}")
        for s in spellings:
            assert Fraction(str(to_number(s))) == value, s
            assert gsm8k_reward(f"so...\n#### {s}", plain) == 1.0, (s, plain)
        assert gsm8k_reward(f"#### {plain}", str(value.numerator // value.denominator + 1)) == 0.0


def test_gsm8k_non_numeric_truth_compares_text():
    assert to_number("1/2") is None
    assert gsm8k_reward("#### 12", "twelve") == 0.0


def test_extract_gsm8k_answer_rejects_unknown_method():
    with pytest.raises(ValueError, match="'strict', 'flexible'"):
        extract_gsm8k_answer("#### 1", method="loose")


# ---------------------------------------------------------------- MATH: the box


@pytest.mark.parametrize("text, want", [
    (r"so \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),
    (r"\boxed{\sqrt{\frac{1}{2}}}", r"\sqrt{\frac{1}{2}}"),  # braces nested twice
    (r"a \boxed{1}, b \boxed{2}", "2"),  # several: the last
    (r"$\boxed 5$", "5"),  # one-token argument
    (r"\boxed 5", "5"),
    (r"\boxed {7}", "7"),
    (r"\fbox{4}", "4"),
    (r"\boxed{\{1,2\}}", r"\{1,2\}"),  # escaped braces don't count
    (r"\boxed{ 3 }", "3"),
    (r"\boxed{3", None),  # truncated
    (r"\boxed{1} and then \boxed{2", None),  # the last box is not closed: no answer (verl's rule)
    (r"\boxedx{3}", None),  # another command, not a box
    (r"\boxed", None),
    ("the answer is 1/2", None),
])
def test_last_boxed(text, want):
    assert last_boxed(text) == want


# ---------------------------------------------------------------- MATH: math-verify

MATH_CASES = [
    (r"so \boxed{0.5}", r"\frac12", 1.0),  # equivalent forms
    (r"\boxed{\frac{1}{2}}", "0.5", 1.0),
    (r"\boxed{\dfrac{1}{2}}", r"\frac{1}{2}", 1.0),
    (r"\boxed{\frac{\sqrt{2}}{2}}", r"\frac{1}{\sqrt{2}}", 1.0),  # equal after simplification
    (r"\boxed{2x+1}", "1+2x", 1.0),
    (r"\boxed{1,000}", "1000", 1.0),  # commas in numbers
    (r"\boxed{-3}", "-3", 1.0),  # negative numbers
    (r"\boxed{3}", "-3", 0.0),
    (r"\boxed{(1,2)}", "(2,1)", 0.0),
    (r"\boxed{\text{(B)}}", r"\text{(B)}", 1.0),
    (r"first \boxed{2}, final \boxed{3}", "3", 1.0),  # several boxes: the last one counts
    (r"first \boxed{2}, final \boxed{3}", "2", 0.0),
    (r"$\boxed 5$", "5", 1.0),
    (r"\boxed{5}", r"\boxed{5}", 1.0),  # a boxed ground truth
    ("the answer is 1/2", "1/2", 0.0),  # no answer
    (r"\boxed{1/2", "1/2", 0.0),  # truncated box
    (r"\boxed{}", "1", 0.0),
    (r"\boxed{\frac{}{}}", "1", 0.0),  # unparsable prediction
    (r"\boxed{5}", r"\frac{", 0.0),  # unparsable ground truth
    (r"\boxed{\frac{", r"\frac{", 0.0),
]


@pytest.mark.parametrize("response, truth, want", MATH_CASES)
def test_math_reward(response, truth, want):
    assert math_reward(response, truth) == want


def test_math_reward_timeout_scores_zero_quickly():
    """sympy runs for minutes on this sum; the deadline stops it."""
    start = time.monotonic()
    assert math_reward(r"\boxed{\sum_{k=1}^{10^{9}} k^{k}}", "1", timeout_s=1) == 0.0
    assert time.monotonic() - start < 5


def test_math_reward_keeps_the_callers_alarm():
    """An alarm set outside (pytest-timeout's, a user's) is still armed, with its handler, after a reward call."""
    old_handler, (old_left, old_interval) = signal.getsignal(signal.SIGALRM), signal.getitimer(signal.ITIMER_REAL)

    def mine(signum, frame):
        raise AssertionError("the outer alarm went off")

    try:
        signal.signal(signal.SIGALRM, mine)
        signal.setitimer(signal.ITIMER_REAL, 100.0)
        assert math_reward(r"\boxed{\frac{1}{2}}", "0.5") == 1.0
        assert math_reward(r"\boxed{\sum_{k=1}^{10^{9}} k^{k}}", "1", timeout_s=0.5) == 0.0
        assert signal.getsignal(signal.SIGALRM) is mine
        assert 90.0 < signal.getitimer(signal.ITIMER_REAL)[0] <= 100.0
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)
        if old_left > 0:
            signal.setitimer(signal.ITIMER_REAL, old_left, old_interval)


def test_math_reward_in_worker_threads_matches_the_main_thread():
    """math-verify's signal timeouts raise outside the main thread; ours are off there, and scores are the same."""
    want = [math_reward(r, t) for r, t, _ in MATH_CASES]
    assert want == [w for _, _, w in MATH_CASES]
    box = {}

    def worker():
        try:
            box["got"] = [math_reward(r, t) for r, t, _ in MATH_CASES]
        except BaseException as e:  # noqa: BLE001 - reported below
            box["error"] = e

    t = threading.Thread(target=worker)
    t.start()
    t.join(timeout=120)
    assert "error" not in box, box.get("error")
    assert box["got"] == want
    with ThreadPoolExecutor(max_workers=4) as pool:
        assert list(pool.map(lambda c: math_reward(c[0], c[1]), MATH_CASES * 3)) == want * 3


# ---------------------------------------------------------------- format and dispatch


@pytest.mark.parametrize("response, style, want", [
    ("work...\n#### 12", "gsm8k", 1.0),
    ("the answer is 12", "gsm8k", 0.0),
    ("#### twelve", "gsm8k", 0.0),
    (r"so \boxed{x^2}", "math", 1.0),
    (r"so \boxed{x^2", "math", 0.0),
    ("#### 12", "math", 0.0),
])
def test_format_reward(response, style, want):
    assert format_reward(response, style=style) == want


def test_format_reward_rejects_unknown_style():
    with pytest.raises(ValueError, match="'gsm8k', 'math'"):
        format_reward("x", style="boxed")


def test_reward_fn_for_maps_verl_data_sources():
    for source in GSM8K_SOURCES:
        assert reward_fn_for(source) is gsm8k_reward
    for source in MATH_SOURCES:
        assert reward_fn_for(source) is math_reward
    assert reward_fn_for("openai/gsm8k")("#### 3", "3") == 1.0
    assert reward_fn_for("DigitalLearningGmbH/MATH-lighteval")(r"\boxed{\frac{6}{4}}", r"\frac32") == 1.0


def test_reward_fn_for_unknown_source_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"no reward function for data_source 'aime'.*openai/gsm8k"):
        reward_fn_for("aime")
