"""The local Slurm cluster (slurm/start-cluster.sh) as the product sees it: discovery, node states, GPU allocation,
and submitit jobs across two nodes, including a task that dies."""

import os
import random
import signal
import socket
import subprocess
import sys
import time

import cloudpickle
import pytest
import submitit

from hpc.cluster import discover, expand_nodelist, parse_timelimit

# The tasks below run in other processes on other "nodes": ship them by value, so the job does not depend on the
# task's working directory or sys.path finding this test module.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

GPU_TYPES = ("h800", "h20", "h100")
TIME_LIMITS = {"h800": 2 * 86400, "h20": 86400, "h100": 12 * 3600, "cpu": None}


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=60, check=check)


def _wait_done(job, timeout_s: float) -> None:
    # force_check: ask sacct every time; submitit's own polling backs off to once a minute
    deadline = time.monotonic() + timeout_s
    while not job.done(force_check=True):
        if time.monotonic() > deadline:
            state = job.state
            job.cancel(check=False)
            pytest.fail(f"job {job.job_id} not done after {timeout_s:.0f} s (state {state})\n"
                        f"stdout: {job.stdout()}\nstderr: {job.stderr()}")
        time.sleep(0.5)


def _state(job) -> str:
    return job.watcher.get_state(job.job_id, mode="force")


def test_discover_sees_partitions_gpu_types_and_counts(slurm_cluster):
    c = slurm_cluster
    assert [p.name for p in c.partitions] == [*GPU_TYPES, "cpu"]
    assert c.default_partition.name == "cpu"
    assert {p.name: p.timelimit_s for p in c.partitions} == TIME_LIMITS
    assert {p.state for p in c.partitions} == {"up"}
    for t in GPU_TYPES:
        nodes = c.nodes_in(t)
        assert [n.name for n in nodes] == [f"{t}-1", f"{t}-2"]
        assert all((n.gpus, n.gpu_type, n.cpus, n.memory_mb) == ({t: 8}, t, 64, 512000) for n in nodes)
    assert {n.name for n in c.nodes_in("cpu")} == {n.name for n in c.nodes}
    assert [(n.name, n.gpus, n.cpus) for n in c.nodes if n.gpu_type is None] == [("cpu-1", {}, 32), ("cpu-2", {}, 32)]
    assert [n.name for n in c.nodes if not n.state.available] == [], c.describe()


def test_drained_node_is_reported_unavailable_then_resumed():
    node = "h20-2"
    _run("scontrol", "update", f"nodename={node}", "state=drain", "reason=test")
    try:
        n = discover().node(node)
        assert not n.state.available
        assert n.state.reason() == "drained" and n.reason_text == "test"
        assert discover().partition("h20").nodes == ("h20-1", "h20-2")  # still listed, just not available
    finally:
        _run("scontrol", "update", f"nodename={node}", "state=resume")
    # a resumed node is "idle*" (not responding) until slurmctld has pinged its slurmd again
    deadline = time.monotonic() + 30
    while not (n := discover().node(node)).state.available:
        assert n.state.reason() == "not responding" and time.monotonic() < deadline, n.state
        time.sleep(0.2)
    assert n.state.reason() == "available" and n.reason_text == ""


def test_gpus_used_follow_allocations():
    job = _run("sbatch", "--parsable", "-p", "h800", "-w", "h800-1", "--gres=gpu:h800:3", "-o", "/dev/null",
               "--wrap", "sleep 60").stdout.strip()
    try:
        deadline = time.monotonic() + 30
        while _run("squeue", "-h", "-j", job, "-o", "%T").stdout.strip() != "RUNNING":
            assert time.monotonic() < deadline, "job did not start"
            time.sleep(0.2)
        n = discover().node("h800-1")
        assert (n.gpus_used, n.num_free_gpus, n.state.name, n.state.reason()) == (3, 5, "mixed", "busy")
    finally:
        _run("scancel", job)


def test_typed_gpu_requests_are_allocated_or_rejected_by_slurm():
    out = _run("srun", "-p", "h100", "-N2", "--gres=gpu:h100:2", "bash", "-c",
               "echo $(hostname) $CUDA_VISIBLE_DEVICES $SLURM_JOB_PARTITION").stdout
    assert sorted(out.splitlines()) == ["h100-1 0,1 h100", "h100-2 0,1 h100"]
    for argv, message in [
        (["-p", "h100", "--gres=gpu:h100:9"], "Requested node configuration is not available"),
        (["-p", "h20", "--gres=gpu:h800:1"], "Requested node configuration is not available"),
        (["-p", "h100", "-N3"], "Node count specification invalid"),
        (["-p", "h100", "--time=13:00:00"], "Requested time limit is invalid"),
    ]:
        p = _run("srun", *argv, "true", check=False)
        assert p.returncode != 0 and message in p.stderr, (argv, p.stderr)


def test_hostlists_expand_like_scontrol():
    rng = random.Random(0)
    for _ in range(40):
        groups = []
        for _ in range(rng.randint(1, 3)):
            width = rng.choice([1, 2, 3])
            ranges = []
            for _ in range(rng.randint(1, 3)):
                lo = rng.randint(0, 20)
                hi = lo + rng.randint(0, 12)
                ranges.append(f"{lo:0{width}d}" + (f"-{hi:0{width}d}" if hi > lo else ""))
            groups.append(rng.choice(["gpu", "n-", "rack"]) + f"[{','.join(ranges)}]")
        expr = ",".join(groups)
        want = _run("scontrol", "show", "hostnames", expr).stdout.split()
        assert expand_nodelist(expr) == want, expr


def test_time_limits_read_back_as_slurm_stores_them():
    try:
        for text in ["5", "30:00", "1-0", "2:00:00", "1-12:00:00", "0:30", "0:90", "1-2:30", "90", "100:00",
                     "UNLIMITED"]:
            _run("scontrol", "update", "partitionname=h100", f"maxtime={text}")
            assert discover().partition("h100").timelimit_s == parse_timelimit(text), text
    finally:
        _run("scontrol", "update", "partitionname=h100", "maxtime=12:00:00")


# --------------------------------------------------------------------------------------------------- submitit

def _gloo_task() -> dict:
    """One task of a 2-node job: all_reduce over gloo with MASTER_ADDR = the first node's hostname."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    env = submitit.JobEnvironment()
    master = env.hostnames[0]
    port = 20000 + int(env.job_id) % 20000
    dist.init_process_group("gloo", init_method=f"tcp://{master}:{port}", rank=env.global_rank,
                            world_size=env.num_tasks, timeout=timedelta(seconds=60))
    try:
        t = torch.tensor([float(env.global_rank + 1)], dtype=torch.float64)
        dist.all_reduce(t)
        hosts = [None] * env.num_tasks
        dist.all_gather_object(hosts, socket.gethostname())
    finally:
        dist.destroy_process_group()
    return {"rank": env.global_rank, "host": socket.gethostname(), "sum": t.item(), "hosts": hosts,
            "master": master, "master_ip": socket.gethostbyname(master),
            "own_ip": socket.gethostbyname(socket.gethostname()), "nodelist": os.environ["SLURM_JOB_NODELIST"],
            "partition": os.environ["SLURM_JOB_PARTITION"]}


def test_two_node_gloo_job_through_submitit(tmp_path):
    ex = submitit.SlurmExecutor(folder=tmp_path / "%j")
    ex.update_parameters(partition="cpu", nodes=2, ntasks_per_node=1, cpus_per_task=1, time=5,
                         job_name="gloo-2-nodes")
    job = ex.submit(_gloo_task)
    _wait_done(job, 180)
    results = sorted(job.results(), key=lambda r: r["rank"])
    assert [r["rank"] for r in results] == [0, 1]
    r0, r1 = results
    assert r0["host"] != r1["host"] and {r0["host"], r1["host"]} == set(expand_nodelist(r0["nodelist"]))
    assert all(r["sum"] == 3.0 and r["hosts"] == [r0["host"], r1["host"]] for r in results)
    # the first node's name resolves, inside every node, to that node's own address
    assert r0["master"] == r0["host"] and r1["master_ip"] == r0["master_ip"] == r0["own_ip"] != r1["own_ip"]
    assert {r["partition"] for r in results} == {"cpu"}
    # the results arrive before accounting catches up (slurmctld writes to slurmdbd asynchronously)
    deadline = time.monotonic() + 30
    while _state(job) in ("PENDING", "RUNNING", "COMPLETING", "UNKNOWN") and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _state(job) == "COMPLETED"


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def test_killed_task_is_reported_failed(tmp_path):
    ex = submitit.SlurmExecutor(folder=tmp_path / "%j")
    ex.update_parameters(partition="cpu", nodes=1, ntasks_per_node=1, time=5, job_name="sigkill")
    job = ex.submit(_die)
    _wait_done(job, 60)  # without accounting (sacct) this never ends: submitit would see no state
    assert _state(job) == "FAILED"
    # result() waits this long for a result file that a slow shared filesystem may not show yet (15 s by
    # default); here the filesystem is local and the file never comes
    job._results_timeout_s = 1
    with pytest.raises(submitit.core.utils.UncompletedJobError, match="has not produced any output"):
        job.result()
