"""Reward scoring throughput: MATH responses through math-verify, one after another in this process, and in the
scoring pool (grpo.scoring) at several worker counts.

    python -m grpo.bench.reward [--responses 2048] [--workers 1,2,4,8,16]

The responses are MATH-style boxed answers (fractions, polynomials, radicals), right and wrong in turn, so both of
math-verify's paths are timed. Prints ms per response and the speed-up over the serial loop; a step of the seeds
scores 5,120 responses.
"""

from __future__ import annotations

import argparse
import time

from grpo.rewards import math_reward
from grpo.scoring import ScoringPool, default_workers

SOURCE = "DigitalLearningGmbH/MATH-lighteval"


def responses(count: int) -> list[tuple]:
    forms = [r"\frac{%d}{%d}", r"%d x^2 + %d", r"\sqrt{%d} + %d", r"(%d, %d)"]
    out = []
    for i in range(count):
        truth = forms[i % len(forms)] % (i % 97 + 1, i % 13 + 2)
        answer = truth if i % 2 == 0 else forms[i % len(forms)] % (i % 97 + 2, i % 13 + 2)
        out.append((SOURCE, f"Working it through step by step ... so the answer is \\boxed{{{answer}}}.", truth,
                    None))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--responses", type=int, default=2048)
    ap.add_argument("--workers", default=",".join(str(w) for w in (1, 2, 4, 8, 16) if w <= default_workers()))
    args = ap.parse_args(argv)
    tasks = responses(args.responses)
    for t in tasks[:8]:  # imports and sympy's first-use costs out of the timing
        math_reward(t[1], t[2])
    t0 = time.perf_counter()
    right = sum(math_reward(t[1], t[2]) for t in tasks)
    serial = time.perf_counter() - t0
    print(f"{len(tasks)} MATH responses ({right:.0f} right), {default_workers()} CPUs usable")
    print(f"{'scorer':>12} {'s':>8} {'ms/resp':>8} {'speed-up':>8} {'5120 resp.':>10}")
    print(f"{'serial':>12} {serial:8.2f} {1e3 * serial / len(tasks):8.2f} {1.0:8.2f} {5120 * serial / len(tasks):9.1f}s")
    for w in (int(x) for x in args.workers.split(",")):
        with ScoringPool(workers=w) as pool:
            pool.score(tasks[:4 * w])  # every worker started and warm
            t0 = time.perf_counter()
            got, _, stats = pool.score(tasks)
            took = time.perf_counter() - t0
        assert sum(got) == right and not stats["timeouts"], stats
        print(f"{f'pool x{w}':>12} {took:8.2f} {1e3 * took / len(tasks):8.2f} {serial / took:8.2f} "
              f"{5120 * took / len(tasks):9.1f}s")


if __name__ == "__main__":
    main()
