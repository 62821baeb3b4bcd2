"""python -m hpc.submit --preset NAME [--dry-run] [--set key=value ...] [--no-follow]

Resolves the preset and overrides, prints the plan, creates the run folder, submits the job through submitit and
follows rank 0's metrics with a progress bar. Bad input exits with code 2 before anything is created or submitted.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from pathlib import Path

from grpo import runlog
from grpo.config import ConfigError, apply_overrides, to_dict, to_json
from hpc.plan import Plan, format_plan, plan_job
from hpc.presets import PRESETS, get_preset


class UsageError(Exception):
    pass


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m hpc.submit", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", required=True, help=f"one of: {', '.join(sorted(PRESETS))}")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config field, e.g. --set train.steps=20 (repeatable)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and exit; create and submit nothing")
    ap.add_argument("--no-follow", action="store_true", help="submit and exit without following progress")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = apply_overrides(get_preset(args.preset), args.overrides)
        plan = plan_job(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_plan(cfg, plan))
    if args.dry_run:
        print("dry run: nothing submitted")
        return 0
    run_dir = make_run_dir(cfg)
    (run_dir / runlog.CONFIG).write_text(to_json(cfg) + "\n")
    (run_dir / "plan.json").write_text(json.dumps(plan.to_dict(), indent=2) + "\n")
    job = submit(cfg, plan, run_dir)
    print(f"job {job.job_id} submitted; logs in {run_dir / 'logs'}")
    if args.no_follow:
        print(f"run folder: {run_dir}")
        return 0
    return follow(job, run_dir, cfg.train.steps)


def make_run_dir(cfg) -> Path:
    base = Path(cfg.out_dir) / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir, k = base, 1
    while run_dir.exists():
        k += 1
        run_dir = base.with_name(f"{base.name}-{k}")
    run_dir.mkdir(parents=True)
    return run_dir.resolve()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def submit(cfg, plan: Plan, run_dir: Path):
    import submitit

    from hpc.launch import RankJob

    if plan.executor != "local":
        raise ConfigError(f"executor {plan.executor!r} is not available yet")
    executor = submitit.LocalExecutor(folder=run_dir / "logs" / "%j")
    executor.update_parameters(tasks_per_node=plan.tasks_per_node, nodes=1,
                               timeout_min=cfg.job.time_limit_min)
    return executor.submit(RankJob(to_dict(cfg), plan.to_dict(), str(run_dir), master_port=free_port()))


def follow(job, run_dir: Path, steps: int) -> int:
    """Progress bar from metrics.jsonl until the job ends; then the summary. Returns the exit code."""
    from tqdm import tqdm

    bar = tqdm(total=steps, unit="step", dynamic_ncols=True)
    seen = 0
    while True:
        done = job.done()
        rows = runlog.read_metrics(run_dir)
        for row in rows[seen:]:
            bar.update(1)
            bar.set_postfix(reward=f"{row['reward']:.3f}", len=f"{row['response_len']:.1f}",
                            step_s=f"{row['step_s']:.2f}")
        seen = len(rows)
        if done:
            break
        time.sleep(0.5)
    bar.close()
    try:
        job.results()
    except Exception as e:  # the job's own traceback is in its logs
        print(f"error: job {job.job_id} failed: {str(e).strip().splitlines()[-1]}", file=sys.stderr)
        print(f"logs: {run_dir / 'logs'}", file=sys.stderr)
        return 1
    if rows:
        first, last = runlog.reward_summary(rows)
        print(f"mean reward: first 10 steps {first:.3f}, last 10 steps {last:.3f} ({last - first:+.3f})")
    print(f"run folder: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
