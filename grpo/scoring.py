"""Scoring dataset responses: the built-in scorers or the user's function, in a pool of worker processes with a
time limit per response.

A user's reward is a Python file and a function with verl's signature (`reward.function=path/to/file.py:fn`):

    def compute_score(data_source, solution_str, ground_truth, extra_info=None) -> float | dict

A dict holds the reward under "score" and anything else worth logging (numbers are averaged into the step's
metrics as `reward_extra/<key>`), as verl's reward managers read it. The function scores every row (verl's
`custom_reward_function` does too); `grpo.rewards.default_compute_score` gives it the built-in scorers.

Why processes: scoring one MATH response through math-verify takes ~7 ms, 35 s a step at 5,120 responses in one
thread; a pool of W processes divides that by W. Why a pool of our own rather than concurrent.futures: a scorer
that hangs (sympy on a pathological answer, a user's function that waits on a socket) must cost a zero reward and a
counted timeout, not a hung job, and a running task of a ProcessPoolExecutor cannot be cancelled. Here each worker
takes one response at a time, the parent knows when each started, and a worker past `timeout_s` is killed
(SIGKILL) and replaced. Processes start with `spawn`: the driver holds torch, threads and process groups that a
fork would copy half-initialised.
"""

from __future__ import annotations

import importlib.util
import math
import multiprocessing as mp
import os
import sys
import time
from collections import deque
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any, Callable

READY = "ready"


def parse_function_spec(spec: str) -> tuple[Path, str]:
    """`path/to/file.py:fn` -> (path, "fn"); ValueError naming the expected form."""
    path, sep, name = spec.rpartition(":")
    if not sep or not path or not name.isidentifier():
        raise ValueError(f"reward.function={spec!r} is not path/to/file.py:function_name")
    return Path(path).expanduser(), name


def load_function(spec: str) -> Callable:
    """Import the file of `spec` (under a module name of its own) and return its function."""
    path, name = parse_function_spec(spec)
    if not path.is_file():
        raise ValueError(f"reward.function: {path} is not a file here (the path must be readable on every node)")
    module_name = f"grpo_user_reward_{abs(hash(str(path.resolve())))}"
    module = sys.modules.get(module_name)
    if module is None:
        loader_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[module_name] = module  # a dataclass or pickle inside the file looks its module up by name
        try:
            loader_spec.loader.exec_module(module)
        except Exception as e:
            del sys.modules[module_name]
            raise ValueError(f"reward.function: importing {path} failed: {type(e).__name__}: {e}") from e
    fn = getattr(module, name, None)
    if not callable(fn):
        found = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        raise ValueError(f"reward.function: {path} has no function {name!r}; its functions: "
                         f"{', '.join(found) or 'none'}")
    return fn


def split_result(result: Any) -> tuple[float, dict]:
    """A scorer's return -> (reward, extra numbers to log). A float (or bool or int), or verl's dict form."""
    extra = {}
    if isinstance(result, dict):
        if "score" not in result:
            raise ValueError(f"a reward function returned a dict without 'score' (keys: {', '.join(result)})")
        extra = {k: float(v) for k, v in result.items() if k != "score" and isinstance(v, (int, float))}
        result = result["score"]
    score = float(result)
    if not math.isfinite(score):
        raise ValueError(f"a reward function returned {score}")
    return score, extra


class Scorer:
    """One response -> (reward, extras): the user's function when `function` is set, else the built-in scorer of
    the row's data source. Built in each worker process from its two settings (picklable, cheap)."""

    def __init__(self, function: str = "", gsm8k: str = "lenient"):
        from grpo import rewards

        self.gsm8k = gsm8k
        self.fn = load_function(function) if function else None
        self._rewards = rewards

    def __call__(self, data_source: str, solution_str: str, ground_truth: str, extra_info=None) -> tuple[float, dict]:
        if self.fn is not None:
            return split_result(self.fn(data_source, solution_str, ground_truth, extra_info))
        return split_result(self._rewards.reward_fn_for(data_source, gsm8k=self.gsm8k)(solution_str, ground_truth))


def _serve(conn, function: str, gsm8k: str) -> None:
    """A worker: build the scorer, say ready, then score one task at a time until the parent closes the pipe."""
    try:
        scorer = Scorer(function, gsm8k)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which refuses to go on
        conn.send(("failed", f"{type(e).__name__}: {e}"))
        return
    conn.send((READY, None))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if msg is None:
            return
        index, args = msg
        try:
            score, extra = scorer(*args)
            conn.send((index, (score, extra, None)))
        except Exception as e:  # noqa: BLE001 - a scorer's bug costs this response, counted, not the run
            conn.send((index, (0.0, {}, f"{type(e).__name__}: {e}")))


class _Worker:
    def __init__(self, ctx, function: str, gsm8k: str):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, function, gsm8k), daemon=True,
                                name="grpo-reward-worker")
        self.proc.start()
        child.close()
        self.ready = False
        self.task: int | None = None  # index of the response being scored
        self.started = 0.0  # when that task (or, before ready, the process) started

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join(5)
        self.conn.close()


def default_workers() -> int:
    """One worker per CPU this process may use (Slurm's cpus-per-task), at most 16."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        cpus = os.cpu_count() or 1
    return max(1, min(16, cpus))


class ScoringPool:
    """`workers` scoring processes; `score(tasks)` scores a batch, each response within `timeout_s`.

    A task is (data_source, solution_str, ground_truth, extra_info). A response whose scorer raises scores 0 and
    counts as an error; one whose scorer runs past `timeout_s` scores 0, counts as a timeout, and its worker is
    killed and replaced. Start-up (importing the user's file) has its own, longer limit.
    """

    def __init__(self, *, function: str = "", gsm8k: str = "lenient", workers: int = 0, timeout_s: float = 10.0,
                 startup_timeout_s: float = 120.0):
        self.function, self.gsm8k = function, gsm8k
        self.num_workers = workers or default_workers()
        if self.num_workers < 1 or timeout_s <= 0:
            raise ValueError(f"reward.workers={workers}, reward.timeout_s={timeout_s}: workers >= 0 (0: one per "
                             "CPU), timeout_s > 0")
        self.timeout_s, self.startup_timeout_s = timeout_s, startup_timeout_s
        self._ctx = mp.get_context("spawn")
        self.workers = [self._spawn() for _ in range(self.num_workers)]
        self.replaced = 0  # workers killed and started again, over the pool's life

    def _spawn(self) -> _Worker:
        w = _Worker(self._ctx, self.function, self.gsm8k)
        w.started = time.monotonic()
        return w

    def _replace(self, w: _Worker) -> _Worker:
        w.kill()
        self.replaced += 1
        new = self._spawn()
        self.workers[self.workers.index(w)] = new
        return new

    def score(self, tasks: list[tuple]) -> tuple[list[float], list[dict], dict]:
        """Rewards and extras in task order, and counts: {"timeouts", "errors", "first_error"}."""
        results: list = [None] * len(tasks)
        todo = deque(range(len(tasks)))
        stats = {"timeouts": 0, "errors": 0, "first_error": None}

        def assign(w: _Worker) -> None:
            if todo and w.ready and w.task is None:
                w.task = todo.popleft()
                w.started = time.monotonic()
                w.conn.send((w.task, tasks[w.task]))

        def fail(w: _Worker, why: str, *, timeout: bool) -> None:
            results[w.task] = (0.0, {})
            stats["timeouts" if timeout else "errors"] += 1
            stats["first_error"] = stats["first_error"] or why

        for w in self.workers:
            assign(w)
        while todo or any(w.task is not None for w in self.workers):
            now = time.monotonic()
            limits = [w.started + (self.timeout_s if w.ready else self.startup_timeout_s) - now for w in self.workers
                      if w.task is not None or not w.ready]
            ready_conns = wait([w.conn for w in self.workers], timeout=max(0.0, min(limits, default=1.0)))
            for w in list(self.workers):
                if w.conn in ready_conns:
                    try:
                        index, payload = w.conn.recv()
                    except (EOFError, OSError):  # the worker died (a scorer that called os._exit, OOM kill, ...)
                        if w.task is not None:
                            fail(w, f"reward worker died (exit code {w.proc.exitcode})", timeout=False)
                            w.task = None
                        elif not w.ready:
                            raise RuntimeError(f"a reward worker died while starting (exit code {w.proc.exitcode})")
                        assign(self._replace(w))
                        continue
                    if index == READY:
                        w.ready = True
                    elif index == "failed":
                        raise RuntimeError(f"a reward worker could not start: {payload}")
                    else:
                        score, extra, error = payload
                        results[index] = (score, extra)
                        if error:
                            stats["errors"] += 1
                            stats["first_error"] = stats["first_error"] or error
                        w.task = None
                    assign(w)
            now = time.monotonic()
            for w in list(self.workers):
                if w.task is not None and now - w.started > self.timeout_s:
                    fail(w, f"a scorer ran past reward.timeout_s={self.timeout_s:g} s", timeout=True)
                    w.task = None
                    assign(self._replace(w))
                elif not w.ready and now - w.started > self.startup_timeout_s:
                    raise RuntimeError(f"a reward worker did not start within {self.startup_timeout_s:g} s "
                                       "(importing the reward function hangs?)")
        return [r[0] for r in results], [r[1] for r in results], stats

    def close(self) -> None:
        for w in self.workers:
            try:
                w.conn.send(None)
            except OSError:
                pass
        for w in self.workers:
            w.proc.join(2)
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join(2)
            w.conn.close()
        self.workers = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
