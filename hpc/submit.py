"""python -m hpc.submit --preset NAME [--config FILE] [--dry-run] [--set key=value ...] [--run-dir DIR [--resume]]
                       [--no-follow]

Resolves the preset and overrides, prints the plan, creates the run folder, submits the job through submitit and
follows rank 0's metrics with a progress bar. Bad input exits with code 2 before anything is created or submitted.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

from grpo import checkpoint, runlog
from grpo.config import (ConfigError, apply_mapping, apply_overrides, check_text, read_config_file, to_dict, to_json,
                         to_yaml)
from hpc import claim
from hpc.checks import check_inputs, check_lead_time
from hpc.plan import Plan, check_config, format_plan, plan_job, slurm_available
from hpc.presets import PRESETS, get_preset
from hpc.sbatch import log_folder, render_sbatch, runner_command, task_python


class UsageError(Exception):
    pass


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m hpc.submit", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", help=f"one of: {', '.join(sorted(PRESETS))} (or `preset:` in the --config file)")
    ap.add_argument("--config", metavar="FILE",
                    help="a YAML file of config keys (nested as the config sections, or dotted), applied on the "
                         "preset; --set applies on top")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config field, e.g. --set train.steps=20 (repeatable)")
    ap.add_argument("--dry-run", action="store_true",
                    help="print the plan and the sbatch script and exit; create and submit nothing")
    ap.add_argument("--cluster-file", metavar="FILE",
                    help="plan against saved sinfo output instead of the live cluster (see hpc/cluster.py)")
    ap.add_argument("--run-dir", metavar="DIR",
                    help="the run folder (default: a new <out_dir>/<name>-<time>); an existing one needs --resume")
    ap.add_argument("--resume", action="store_true",
                    help="continue the run in --run-dir from its latest checkpoint; its config must match, except "
                         "train.steps and job.* (more steps, other resources)")
    ap.add_argument("--no-follow", action="store_true", help="submit and exit without following progress")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.run_dir is not None:
            check_text("--run-dir", args.run_dir)
        cfg = resolve_config(args)
        check_config(cfg)  # the config alone, before the cluster is asked anything
        check_run_dir(cfg, args.run_dir, args.resume)
        try:
            cluster = read_cluster(cfg, args.cluster_file)
        except ConfigError as e:
            if not args.dry_run or args.cluster_file:
                raise
            cluster = None  # a dry run still shows the plan for the nominal hardware
            print(f"warning: {e}", file=sys.stderr)
        plan = plan_job(cfg, cluster)
        if plan.executor == "slurm" and not args.dry_run and not slurm_available():
            raise ConfigError("no Slurm on this machine (sbatch, srun or sinfo not found): run with --dry-run to "
                              "see the plan, or submit from a login node of the cluster")
        try:
            plan.notes += check_inputs(cfg)
        except ConfigError as e:
            if not args.dry_run:
                raise
            plan.notes.append(f"a submission would be refused: {e}")
        plan.notes.append(check_lead_time(cfg, plan))
    except (ConfigError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_plan(cfg, plan))
    if args.dry_run:
        if plan.executor == "slurm":
            print("sbatch script:")
            print(render_sbatch(cfg, plan, Path(cfg.out_dir).resolve() / f"{cfg.name}-<time>"))
        print("dry run: nothing submitted")
        return 0
    try:
        run_dir = open_run_dir(cfg, plan, args.run_dir)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.resume and checkpoint.latest(run_dir) is None:
        print(f"note: {run_dir} holds no checkpoint yet: the run starts again from step 1", file=sys.stderr)
    try:
        job = submit(cfg, plan, run_dir)
    except BaseException:
        claim.release(run_dir)
        raise
    claim.record_job(run_dir, executor=plan.executor, job_id=str(job.job_id))
    print(f"job {job.job_id} submitted; rank 0 log: {job.paths.stdout}")
    if args.no_follow:
        print(f"run folder: {run_dir}")
        return 0
    return follow(job, run_dir, cfg.train.steps, local=plan.executor == "local", export=cfg.train.export_hf)


def resolve_config(args):
    """The preset, then the --config file, then --set: each later one wins."""
    file = read_config_file(args.config) if args.config else {}
    named = file.pop("preset", None)
    if named is not None and args.preset and named != args.preset:
        raise ConfigError(f"--preset {args.preset} and `preset: {named}` in {args.config} disagree; give one")
    preset = args.preset or named
    if not preset:
        raise ConfigError(f"no preset: give --preset NAME or `preset: NAME` in the --config file; presets: "
                          f"{', '.join(sorted(PRESETS))}")
    cfg = apply_mapping(get_preset(preset), file, where=f"--config {args.config}") if file else get_preset(preset)
    return apply_overrides(cfg, args.overrides)


RESUMABLE_CHANGES = ("train.steps", "job.")


def check_run_dir(cfg, run_dir: str | None, resume: bool) -> None:
    """An existing run folder is only continued on --resume, and only with the config it was started with."""
    if resume and not run_dir:
        raise ConfigError("--resume needs --run-dir DIR (the run folder to continue)")
    if not run_dir or not Path(run_dir).exists():
        if resume:
            raise ConfigError(f"--resume: run folder {run_dir} does not exist")
        return
    stored_path = Path(run_dir) / runlog.CONFIG
    if not stored_path.is_file():
        raise ConfigError(f"{run_dir} exists but is not a run folder (no {runlog.CONFIG}); choose another --run-dir")
    try:
        stored = json.loads(stored_path.read_text())
        if not isinstance(stored, dict):
            raise ValueError(f"a JSON {type(stored).__name__}, not an object")
    except (OSError, ValueError) as e:
        raise ConfigError(f"{stored_path} cannot be read as a config ({e}); it is not a run folder this command "
                          "wrote: choose another --run-dir") from None
    stored = flatten(stored)
    new = flatten(to_dict(cfg))
    changed = sorted(k for k in set(stored) | set(new)
                     if stored.get(k) != new.get(k) and not k.startswith(RESUMABLE_CHANGES))
    if changed:
        k = changed[0]
        raise ConfigError(f"run folder {run_dir} holds a different config ({len(changed)} key(s) differ, e.g. "
                          f"{k}: {stored.get(k)!r} there, {new.get(k)!r} now); use a new --run-dir")
    if not resume:
        raise ConfigError(f"run folder {run_dir} already exists: add --resume to continue it, or choose another")


def open_run_dir(cfg, plan: Plan, run_dir_arg: str | None) -> Path:
    """Create the run folder (or reopen it on --resume), claim it for this launch (hpc.claim), and write
    config.json and plan.json. A folder that cannot be written (read-only, full disk, no permission) or is in use
    is one-line ConfigError, and a folder this call created is removed again."""
    created = None
    run_dir = Path(run_dir_arg).resolve() if run_dir_arg else None
    try:
        if run_dir is None:
            run_dir = created = make_run_dir(cfg)
        else:
            try:
                run_dir.mkdir(parents=True)
                created = run_dir
            except FileExistsError:
                pass  # --resume, or another launch made it a moment ago: the claim decides
        claim.claim(run_dir, executor=plan.executor)
        try:
            (run_dir / runlog.CONFIG).write_text(to_json(cfg) + "\n")
            (run_dir / "config.yaml").write_text(to_yaml(cfg))
            (run_dir / "plan.json").write_text(json.dumps(plan.to_dict(), indent=2) + "\n")
        except BaseException:
            claim.release(run_dir)
            raise
    except OSError as e:
        if created:
            shutil.rmtree(created, ignore_errors=True)
        raise ConfigError(f"cannot write the run folder {run_dir or cfg.out_dir}: {e.strerror or e}; choose a "
                          "writable --run-dir (or out_dir) with free space") from None
    except ConfigError:
        if created:
            shutil.rmtree(created, ignore_errors=True)
        raise
    return run_dir


def flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def read_cluster(cfg, cluster_file: str | None):
    """The cluster to plan against: a saved sinfo file, the live cluster, or None (nominal hardware)."""
    if cluster_file:
        from hpc.cluster import load_cluster_file

        try:
            return load_cluster_file(cluster_file)
        except ValueError as e:
            raise ConfigError(f"--cluster-file {cluster_file}: {e}") from None
    if cfg.job.executor == "local" or not slurm_available():
        return None
    from hpc.cluster import discover

    try:
        return discover()
    except ValueError as e:  # hpc.cluster.ClusterError: sinfo failed or said something unreadable
        raise ConfigError(f"cannot read the cluster: {e}") from None


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


def slurm_executor(cfg, plan: Plan, run_dir: Path):
    """A submitit SlurmExecutor that hands sbatch the script of `hpc.sbatch.render_sbatch`, nothing of its own."""
    import submitit

    class Executor(submitit.SlurmExecutor):
        def _make_submission_file_text(self, command: str, uid: str) -> str:  # submitit's hook for the script
            if command != runner_command(run_dir):
                raise RuntimeError(f"submitit's task runner changed ({command!r}, expected "
                                   f"{runner_command(run_dir)!r}): update hpc/sbatch.py")
            return render_sbatch(cfg, plan, run_dir)

    executor = Executor(folder=log_folder(run_dir), python=task_python())
    # what submitit itself reads back: the task count (its job object) and the time limit (its timeout count)
    executor.update_parameters(nodes=plan.nodes, ntasks_per_node=plan.tasks_per_node, time=cfg.job.time_limit_min)
    return executor


def submit(cfg, plan: Plan, run_dir: Path):
    import submitit

    from hpc.launch import RankJob

    if plan.executor == "slurm":
        executor = slurm_executor(cfg, plan, run_dir)
        port = None  # derived from the job id on every node
    else:
        executor = submitit.LocalExecutor(folder=run_dir / "logs" / "%j")
        executor.update_parameters(tasks_per_node=plan.tasks_per_node, nodes=1, timeout_min=cfg.job.time_limit_min,
                                   gpus_per_node=plan.gpus_per_node, **visible_gpus())
        port = free_port()
    # A local job's processes share this terminal's process group, so Ctrl-C would reach them too: submitit's
    # controller would then kill its tasks within a second, before they could save. They start with SIGINT ignored
    # (an ignored signal stays ignored across exec), and `follow` turns this process's Ctrl-C into a SIGTERM to
    # the job, which saves a checkpoint and stops.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if plan.executor == "local" else None
    try:
        return executor.submit(RankJob(to_dict(cfg), plan.to_dict(), str(run_dir), master_port=port))
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def visible_gpus() -> dict:
    """The GPUs this process was given (CUDA_VISIBLE_DEVICES), for submitit's local executor, which would otherwise
    set its tasks' CUDA_VISIBLE_DEVICES to 0..n-1: on a shared host those can be someone else's GPUs."""
    ids = [x.strip() for x in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if x.strip()]
    return {"visible_gpus": [int(x) for x in ids]} if ids and all(x.isdigit() for x in ids) else {}


def follow(job, run_dir: Path, steps: int, *, local: bool, export: bool = False) -> int:
    """Progress bar from metrics.jsonl until the job ends; then the summary. Returns the exit code: 0 done, 1
    failed, 3 stopped early (resumable), 130 the follower itself was interrupted and left the job running.

    Ctrl-C (or SIGTERM) here stops a local job the way a SIGTERM to the job does (it saves, then stops); a Slurm
    job runs on, and the message says how to follow or stop it."""
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        try:
            watch(job, run_dir, steps, bar=True)
        except KeyboardInterrupt:
            if not local:
                print(f"\nthe follower stopped; job {job.job_id} runs on in Slurm (progress: "
                      f"{run_dir / runlog.METRICS}); stop it with `scancel {job.job_id}`", file=sys.stderr)
                return 130
            print(f"\nstopping job {job.job_id}: it saves a checkpoint first (Ctrl-C again to leave it running)",
                  file=sys.stderr)
            os.kill(int(job.job_id), signal.SIGTERM)  # submitit's local controller forwards it to every task
            try:
                watch(job, run_dir, steps, bar=False)
            except KeyboardInterrupt:
                print(f"job {job.job_id} runs on (pid {job.job_id}); stop it with `kill {job.job_id}`",
                      file=sys.stderr)
                return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    return report(job, run_dir, steps, export=export)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def watch(job, run_dir: Path, steps: int, *, bar: bool) -> None:
    """Poll the job and its metrics until it ends, drawing a progress bar when `bar`."""
    from tqdm import tqdm

    progress = tqdm(total=steps, unit="step", dynamic_ncols=True, disable=not bar)
    seen, polls = 0, 0
    try:
        while True:
            done = job.done(force_check=polls % 10 == 0)  # sacct at most every 5 s; result files every 0.5 s
            rows = runlog.read_metrics(run_dir)
            if len(rows) < seen:  # a requeued run resumed from its checkpoint: those steps are redone
                progress.reset()
                seen = 0
            for row in rows[seen:]:
                progress.update(1)
                progress.set_postfix(reward=f"{row['reward']:.3f}", len=f"{row['response_len']:.1f}",
                                     step_s=f"{row['step_s']:.2f}")
            seen = len(rows)
            if done:
                return
            polls += 1
            time.sleep(0.5)
    finally:
        progress.close()


def report(job, run_dir: Path, steps: int, *, export: bool = False) -> int:
    """The end of a followed job: its summary (0), the stop message of a run that ended early (3), or the failure
    with the ranks that failed and why (1). The job no longer runs, so its claim on the run folder ends."""
    claim.release(run_dir)
    try:
        results = job.results()
    except Exception as e:  # noqa: BLE001 - whatever the job raised; its traceback is in its logs
        if str(job.state).startswith("CANCELLED"):
            print(f"job {job.job_id} was cancelled; {stopped_message(run_dir, steps)}", file=sys.stderr)
            return 3
        causes = explain_failure(run_dir / "logs" / str(job.job_id))
        last = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        print(f"error: job {job.job_id} failed ({job.state})" + ("" if causes else f": {last}"), file=sys.stderr)
        for line in causes:
            print(f"  {line}", file=sys.stderr)
        print(f"logs: {run_dir / 'logs' / str(job.job_id)}", file=sys.stderr)
        return 1
    statuses = {r.get("status") for r in results if isinstance(r, dict)}
    if statuses - {"done"}:
        why = "the time limit was near" if "requeue" in statuses else "it was asked to stop (SIGTERM or Ctrl-C)"
        print(f"job {job.job_id} ended early because {why}; {stopped_message(run_dir, steps)}", file=sys.stderr)
        return 3
    rows = runlog.read_metrics(run_dir)
    if rows:
        first, last = runlog.reward_summary(rows)
        print(f"mean reward: first 10 steps {first:.3f}, last 10 steps {last:.3f} ({last - first:+.3f})")
    if export and not (run_dir / "hf").is_dir():
        print(f"note: the Hugging Face export was skipped (too little time was left before the job's limit); "
              f"write it with `python -m grpo.export {run_dir}`", file=sys.stderr)
    print(f"run folder: {run_dir}")
    return 0


def stopped_message(run_dir: Path, steps: int) -> str:
    """What an early stop prints: how far the run got and how to continue it."""
    last = checkpoint.latest(run_dir)
    step = int(last.name.split("_")[-1]) if last else 0
    return (f"stopped at step {step} of {steps}; continue with `--run-dir {run_dir} --resume` (added to the command "
            "that started the run)")


def explain_failure(log_dir: Path) -> list[str]:
    """Which ranks failed, on which host, with what: srun's own report when there is one, else the last error
    line of each rank's log."""
    texts = {f: f.read_text(errors="replace") for f in sorted(log_dir.glob("*_log.*"))}
    found = []
    for text in texts.values():
        for host, task, what in re.findall(r"srun: error: (\S+): tasks? ([\d,-]+): (.+)", text):
            found.append(f"rank {task} on {host}: {what.strip()}")
    full = [ln.strip() for text in texts.values() for ln in text.splitlines() if "No space left on device" in ln]
    if full:  # the cause, whatever the ranks then failed on
        found.append(f"the disk is full: {full[-1][:300]}; free space (or move the run folder) and resume")
    if found:
        return sorted(set(found))
    killed = []
    for path, text in texts.items():
        m = re.fullmatch(r".*_(\d+)_log\.err", path.name)
        if not m:
            continue
        errors = [ln for ln in text.splitlines() if re.search(r"(Error|Exception)\b", ln)]
        out = texts.get(path.with_suffix(".out"), "")
        host = re.search(r"hostname=([^,\s)]+)", out)
        where = f"rank {m.group(1)} on {host.group(1) if host else '?'}"
        if errors:
            found.append(f"{where}: " + re.sub(r"^\[rank\d+\]:\s*", "", errors[-1]).strip())
        elif "Starting with JobEnvironment" in out and not path.with_name(
                path.name.replace("_log.err", "_result.pkl")).exists():
            # it started, then left no error and no result (submitit writes one for a return and for a raise):
            # killed from outside
            killed.append(f"{where}: killed by a signal (it left no error and no result: SIGKILL, or the "
                          "out-of-memory killer)")
    # the killed rank is the cause when its peers only lost their connection to it
    peers_only = all(re.search(PEER_LOST, line) for line in found)
    return (killed + found if peers_only else found + killed)[:8]


PEER_LOST = r"[Cc]onnection (reset|closed|refused)|Broken pipe|peer|timed out|Timeout"


if __name__ == "__main__":
    sys.exit(main())
