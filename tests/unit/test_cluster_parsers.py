"""Tests for hpc/cluster.py against real Slurm outputs (tests/fixtures/README.md says where each comes from)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from hpc.cluster import (SINFO_ARGV, SINFO_COMMAND, Cluster, ClusterError, NodeState, discover, expand_nodelist,
                         load_cluster_file, parse_gres, parse_node_state, parse_sinfo, parse_timelimit)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
LOCAL = FIXTURES / "local-22.05"
EXTERNAL = FIXTURES / "external"
MOMENTS = ("busy", "stopped", "down")


# ------------------------------------------------------------------------------------------ expand_nodelist

def _hostnames():
    for line in (LOCAL / "hostnames.txt").read_text().splitlines():
        expr, names = line.split("\t")
        yield pytest.param(expr, names.split(), id=expr[:40])


@pytest.mark.parametrize("expr, names", list(_hostnames()))
def test_expand_nodelist_matches_scontrol_show_hostnames(expr, names):
    assert expand_nodelist(expr) == names


@pytest.mark.parametrize("expr", ["n[5-3]", "n[]", "n[a-b]", "n[1-2", "n1-2]", "n[1-2]]", "n[[1-2]]", "n[1,,2]"])
def test_expand_nodelist_rejects_what_slurm_rejects(expr):
    with pytest.raises(ValueError, match="hostlist"):
        expand_nodelist(expr)


@pytest.mark.parametrize("expr", ["", "  ", "(null)", "N/A"])
def test_expand_nodelist_empty(expr):
    assert expand_nodelist(expr) == []


def test_expand_nodelist_suffix_after_last_bracket():
    # Slurm 22.05 calls this invalid; other versions and tools write it, and the meaning is plain
    assert expand_nodelist("n[1-3]-ib") == ["n1-ib", "n2-ib", "n3-ib"]


@pytest.mark.parametrize("path", sorted(EXTERNAL.glob("sinfo-*.txt")), ids=lambda p: p.name)
def test_expand_nodelist_counts_match_sinfo_nodes_column(path):
    lines = path.read_text().splitlines()
    header = lines[0].split()
    i_nodes, i_list = header.index("NODES"), header.index("NODELIST")
    for line in lines[1:]:
        cells = line.split()
        assert len(expand_nodelist(cells[i_list])) == int(cells[i_nodes]), line


# ------------------------------------------------------------------------------------------------ parse_gres

@pytest.mark.parametrize("text, gpus", [
    ("gpu:h100:8(S:0-1),shard:2", {"h100": 8}),
    ("gpu:4", {None: 4}),
    ("(null)", {}),
    ("", {}),
    ("gpu:a100:8", {"a100": 8}),  # ParallelCluster p4d node
    ("gpu:h800:3(IDX:0-2)", {"h800": 3}),  # local GresUsed
    ("gpu:h20:0(IDX:N/A)", {"h20": 0}),  # local GresUsed, idle node
    ("gpu:0", {None: 0}),  # local GresUsed, node without GPUs
    ("gpu:(null):0(IDX:N/A)", {None: 0}),
    ("gpu:a100:2(S:2,5)", {"a100": 2}),  # a comma inside the socket list
    ("gpu:a100:2(IDX:0,3)", {"a100": 2}),
    ("gpu:p100:2(S:0-1),gpu:v100:2(S:0-1)", {"p100": 2, "v100": 2}),
    ("gpu:2,gpu:h100:1,gpu:h100:1", {None: 2, "h100": 2}),
    ("gpu:2K(S:0-2023)", {None: 2048}),  # gres.conf(5): K multiplies by 1024
    ("gpu:a100:no_consume:4", {"a100": 4}),
    ("gpu:nvidia_h100_80gb_hbm3:8(S:0-1)", {"nvidia_h100_80gb_hbm3": 8}),
    ("gpu:1g.10gb:4,gpu:3g.40gb:1", {"1g.10gb": 4, "3g.40gb": 1}),  # MIG slices
    ("mps:400,gpu:2,bandwidth:lustre:4G", {None: 2}),
    ("gres/gpu:h100=2", {"h100": 2}),
    ("gpu", {None: 1}),
    ("gpu:h100", {"h100": 1}),
])
def test_parse_gres(text, gpus):
    assert parse_gres(text) == gpus


def test_parse_gres_rejects_garbage():
    with pytest.raises(ValueError, match="GRES"):
        parse_gres("gpu:a:b:4")


@pytest.mark.parametrize("moment", MOMENTS)
def test_parse_gres_matches_scontrol_tres(moment):
    """Per node, GRES and GresUsed from sinfo agree with CfgTRES/AllocTRES from scontrol (an independent view)."""
    cluster = parse_sinfo((LOCAL / f"sinfo-{moment}.txt").read_text())
    for line in (LOCAL / f"scontrol-node-{moment}.txt").read_text().splitlines():
        name = re.search(r"NodeName=(\S+)", line).group(1)
        cfg = dict(re.findall(r"gres/gpu:(\w+)=(\d+)", re.search(r"CfgTRES=(\S*)", line).group(1)))
        alloc = re.search(r"AllocTRES=\S*?gres/gpu=(\d+)", line)
        node = cluster.node(name)
        assert node.gpus == {t: int(n) for t, n in cfg.items()}, name
        assert node.gpus_used == (int(alloc.group(1)) if alloc else 0), name


# -------------------------------------------------------------------------------------------- parse_timelimit

@pytest.mark.parametrize("text, seconds", [
    ("30:00", 1800), ("1-12:00:00", 129600), ("2:00:00", 7200), ("5", 300), ("1-0", 86400),
    ("2-00:00:00", 172800), ("12:00:00", 43200), ("1-2:30", 95400), ("00:05:00", 300), ("90", 5400),
    ("100:00", 6000), ("1-2", 93600),
    ("0:30", 60), ("0:90", 120), ("00:00:30", 60), ("0", 0),  # Slurm rounds seconds up to whole minutes
    ("infinite", None), ("UNLIMITED", None), (" 7-00:00:00 ", 604800),
])
def test_parse_timelimit(text, seconds):
    assert parse_timelimit(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "1:2:3:4", "-5", "1-", "1-2:3:4:5", "1.5"])
def test_parse_timelimit_rejects(text):
    with pytest.raises(ValueError, match="time limit"):
        parse_timelimit(text)


# ------------------------------------------------------------------------------------------ parse_node_state

@pytest.mark.parametrize("token, name, flags, available, reason", [
    ("idle", "idle", set(), True, "available"),
    ("IDLE", "idle", set(), True, "available"),
    ("idle~", "idle", {"powered_down"}, False, "powered down"),
    ("idle#", "idle", {"powering_up"}, False, "powering up"),  # Cluster in the Cloud
    ("idle%", "idle", {"powering_down"}, False, "powering down"),  # ParallelCluster tests
    ("idle!", "idle", {"power_down"}, False, "powering down"),
    ("idle$", "idle", {"maint"}, False, "maintenance"),
    ("idle@", "idle", {"reboot_requested"}, False, "reboot pending"),
    ("idle^", "idle", {"reboot_issued"}, False, "rebooting"),
    ("idle*", "idle", {"not_responding"}, False, "not responding"),
    ("mix-", "mixed", {"planned"}, False, "busy"),
    ("plnd", "planned", {"planned"}, False, "planned"),
    ("drng", "draining", {"drain"}, False, "draining"),
    ("drng*", "draining", {"drain", "not_responding"}, False, "draining"),
    ("drain", "drained", {"drain"}, False, "drained"),
    ("drained", "drained", {"drain"}, False, "drained"),
    ("drained*", "drained", {"drain", "not_responding"}, False, "drained"),  # ParallelCluster tests
    ("alloc*", "allocated", {"not_responding"}, False, "not responding"),
    ("alloc", "allocated", set(), False, "busy"),
    ("allocated+", "allocated", {"completing"}, False, "busy"),
    ("mix", "mixed", set(), False, "busy"),
    ("comp", "completing", {"completing"}, False, "completing"),
    ("down", "down", set(), False, "down"),
    ("down*", "down", {"not_responding"}, False, "down"),
    ("down#", "down", {"powering_up"}, False, "down"),  # ParallelCluster PR 398
    ("down~", "down", {"powered_down"}, False, "down"),  # ParallelCluster PR 398
    ("fail", "fail", {"fail"}, False, "failing"),
    ("failg", "failing", {"fail"}, False, "failing"),
    ("maint", "maint", {"maint"}, False, "maintenance"),
    ("resv", "reserved", {"reserved"}, False, "reserved"),
    ("futr", "future", set(), False, "future"),
    ("unk*", "unknown", {"not_responding"}, False, "not responding"),
    ("inval", "inval", set(), False, "inval"),
    ("npc", "perfctrs", {"perfctrs"}, False, "busy"),
    ("IDLE+DRAIN", "idle", {"drain"}, False, "drained"),
    ("MIXED+DRAIN", "mixed", {"drain"}, False, "draining"),
    ("MIXED+COMPLETING", "mixed", {"completing"}, False, "busy"),
    ("IDLE+COMPLETING", "idle", {"completing"}, False, "completing"),
    ("DOWN+NOT_RESPONDING", "down", {"not_responding"}, False, "down"),
    ("ALLOCATED+NOT_RESPONDING", "allocated", {"not_responding"}, False, "not responding"),
    ("IDLE+MAINTENANCE+RESERVED", "idle", {"maint", "reserved"}, False, "maintenance"),
    ("IDLE+CLOUD", "idle", {"cloud"}, True, "available"),  # a cloud node that is up
    ("IDLE+CLOUD+POWER_DOWN+POWERED_DOWN", "idle", {"cloud", "power_down", "powered_down"}, False, "powered down"),
    ("DOWN+CLOUD+POWER_DOWN+POWERED_DOWN+NOT_RESPONDING", "down",
     {"cloud", "power_down", "powered_down", "not_responding"}, False, "down"),
    ("IDLE+POWER", "idle", {"powered_down"}, False, "powered down"),  # older Slurm, fasrc collector
    ("IDLE+PLANNED", "idle", {"planned"}, False, "planned"),
    ("IDLE+SOMETHING_NEW", "idle", {"something_new"}, False, "something new"),  # unknown flag: not available
])
def test_parse_node_state(token, name, flags, available, reason):
    state = parse_node_state(token)
    assert (state.name, set(state.flags)) == (name, flags)
    assert state.available is available
    assert state.reason() == reason


# every state name in `man sinfo` (22.05) NODE STATE CODES and in its --states list
MAN_STATES = ("ALLOCATED ALLOCATED+ COMPLETING DOWN DRAINED DRAINING FAIL FAILING FUTURE IDLE INVAL MAINT "
              "REBOOT_ISSUED REBOOT_REQUESTED MIXED PERFCTRS NPC PLANNED POWER_DOWN POWERED_DOWN POWERING_DOWN "
              "POWERING_UP RESERVED UNKNOWN ALLOC CLOUD COMP DRAIN FUTR MIX RESV UNK").split()


@pytest.mark.parametrize("token", MAN_STATES)
def test_every_documented_state_parses_and_only_idle_is_available(token):
    state = parse_node_state(token)
    assert state.available is (token == "IDLE")
    assert re.fullmatch(r"[a-z]+( [a-z]+)?", state.reason()), state.reason()  # a short word or two


@pytest.mark.parametrize("token", ["", "   ", "bogus", "idle?", "+drain"])
def test_parse_node_state_rejects(token):
    with pytest.raises(ValueError):
        parse_node_state(token)


def _views(moment):
    """node -> every spelling of its state at one moment: compact, long, StateComplete, scontrol."""
    views = {}
    for line in (LOCAL / f"sinfo-states-{moment}.txt").read_text().splitlines()[1:]:
        node, _, compact, long, _ = line.split("|")
        views.setdefault(node, []).extend([compact, long])
    for line in (LOCAL / f"sinfo-{moment}.txt").read_text().splitlines()[1:]:
        cells = line.split("|")
        views[cells[0]].extend([cells[2], cells[3]])
    for line in (LOCAL / f"scontrol-node-{moment}.txt").read_text().splitlines():
        node, state = re.search(r"NodeName=(\S+) .* State=(\S+)", line).groups()
        views[node].append(state)
    return views


EXPECTED_REASONS = {  # tests/fixtures/README.md: what was done to each node
    "busy": {"h800-1": "busy", "h800-2": "draining", "h20-1": "drained", "h20-2": "down", "h100-1": "busy",
             "h100-2": "failing", "cpu-1": "maintenance", "cpu-2": "completing"},
    "stopped": {"h800-1": "busy", "h800-2": "draining", "h20-1": "drained", "h20-2": "available",
                "h100-1": "not responding", "h100-2": "failing", "cpu-1": "maintenance", "cpu-2": "reserved"},
    "down": {"h800-1": "busy", "h800-2": "draining", "h20-1": "drained", "h20-2": "available", "h100-1": "down",
             "h100-2": "failing", "cpu-1": "maintenance", "cpu-2": "reserved"},
}


@pytest.mark.parametrize("moment", MOMENTS)
def test_every_spelling_of_a_live_state_gives_the_same_verdict(moment):
    for node, spellings in _views(moment).items():
        assert len(spellings) in (5, 9), (node, spellings)  # 2 sinfo -N lines x 2 states per partition + scontrol
        for token in spellings:
            state = parse_node_state(token)
            assert state.reason() == EXPECTED_REASONS[moment][node], (node, token)
            assert state.available is (EXPECTED_REASONS[moment][node] == "available"), (node, token)


# ----------------------------------------------------------------------------------------------- parse_sinfo

def test_parse_sinfo_local_cluster():
    c = parse_sinfo((LOCAL / "sinfo-busy.txt").read_text())
    assert [p.name for p in c.partitions] == ["h800", "h20", "h100", "cpu"]
    assert c.default_partition.name == "cpu" and [p.default for p in c.partitions] == [False] * 3 + [True]
    assert [p.timelimit_s for p in c.partitions] == [2 * 86400, 86400, 12 * 3600, None]
    assert {p.state for p in c.partitions} == {"up"}
    assert c.partition("h800").nodes == ("h800-1", "h800-2")
    assert len(c.nodes) == 8 and len(c.partition("cpu").nodes) == 8
    for t in ("h800", "h20", "h100"):
        for node in c.nodes_in(t):
            assert (node.gpu_type, node.num_gpus, node.cpus, node.memory_mb) == (t, 8, 64, 512000)
            assert node.partitions == (t, "cpu")
    cpu1 = c.node("cpu-1")
    assert (cpu1.gpus, cpu1.gpu_type, cpu1.num_gpus, cpu1.cpus, cpu1.memory_mb, cpu1.partitions) == \
        ({}, None, 0, 32, 128000, ("cpu",))
    h800_1, h800_2 = c.nodes_in("h800")
    assert (h800_1.gpus_used, h800_1.num_free_gpus, h800_2.gpus_used) == (3, 5, 8)
    assert h800_2.state == NodeState("draining", frozenset({"drain"}))
    assert h800_2.reason_text == "bad nvlink: draining" and h800_1.reason_text == ""
    assert c.node("h20-2").state.reason() == "down" and c.node("h20-2").reason_text == "node crashed"
    assert sum(n.state.available for n in c.nodes) == 0


def test_parse_sinfo_reads_its_own_describe():
    c = parse_sinfo((LOCAL / "sinfo-down.txt").read_text())
    assert c.describe().splitlines() == [
        "h800: up, 2-00:00:00, 0/2 nodes available, h800:8",
        "h20: up, 1-00:00:00, 1/2 nodes available, h20:8",
        "h100: up, 12:00:00, 0/2 nodes available, h100:8",
        "cpu*: up, no limit, 1/8 nodes available, h100:8, h20:8, h800:8",
    ]


def test_parse_sinfo_partition_oriented_man_page_example():
    c = parse_sinfo((EXTERNAL / "sinfo-man-22.05.txt").read_text())
    assert [(p.name, p.default, p.timelimit_s, len(p.nodes)) for p in c.partitions] == [
        ("batch", False, None, 8), ("debug", True, 1800, 8)]
    assert [n.name for n in c.nodes_in("batch") if not n.state.available] == ["adev8", "adev9"]
    assert all(n.gpus == {} and n.state.available for n in c.nodes_in("debug"))


def test_parse_sinfo_cloud_clusters():
    pc = parse_sinfo((EXTERNAL / "sinfo-parallelcluster-pr398.txt").read_text())
    assert [(p.name, p.default, len(p.nodes)) for p in pc.partitions] == [("queue1", True, 30), ("queue2", False, 30)]
    assert {n.state.reason() for n in pc.nodes_in("queue1")} == {"down", "powered down"}
    assert pc.node("queue1-dy-c-1-1").state == NodeState("down", frozenset({"powering_up"}))
    cic = parse_sinfo((EXTERNAL / "sinfo-clusterinthecloud-issue19.txt").read_text())
    nodes = cic.nodes_in("compute")
    assert len(nodes) == 23 and sum(n.state.available for n in nodes) == 6
    assert {n.state.reason() for n in nodes if not n.state.available} == {"powering up"}


@pytest.mark.parametrize("text, match", [
    ("", "empty"),
    ("NODES STATE\n1 idle\n", "NODELIST and PARTITION"),
    ("NODELIST|PARTITION|STATE\nn1|p|idle|extra|\n", "columns"),
    ("NODELIST|PARTITION|STATE\nn1|p|sleepy\n", "line 2.*node state"),
    ("NODELIST|PARTITION|STATE|TIMELIMIT\nn[1-|p|idle|1:00\n", "line 2.*hostlist"),
])
def test_parse_sinfo_errors_say_what_to_do(text, match):
    with pytest.raises(ClusterError, match=match):
        parse_sinfo(text)


def test_load_cluster_file(tmp_path):
    path = tmp_path / "cluster.txt"
    path.write_text((LOCAL / "sinfo-busy.txt").read_text())
    assert load_cluster_file(path) == parse_sinfo(path.read_text())
    with pytest.raises(ClusterError, match=re.escape(SINFO_COMMAND)):
        load_cluster_file(tmp_path / "missing.txt")


def test_cluster_partition_lookup_lists_partitions():
    c = parse_sinfo((LOCAL / "sinfo-busy.txt").read_text())
    with pytest.raises(ClusterError, match="h800, h20, h100, cpu"):
        c.partition("a100")
    assert c.nodes_in(c.partition("h20")) == c.nodes_in("h20")
    assert Cluster(partitions=(), nodes=()).default_partition is None


# ------------------------------------------------------------------------------------------------- discover

class FakeRun:
    """Stands in for subprocess.run: records argv, returns what a real sinfo printed (or failed with)."""

    def __init__(self, *results):
        self.results, self.calls = list(results), []

    def __call__(self, argv, **kwargs):
        self.calls.append((argv, kwargs))
        result = self.results.pop(0)
        if isinstance(result, BaseException):
            raise result
        code, out, err = result
        return subprocess.CompletedProcess(argv, code, out, err)


def test_discover_runs_the_documented_command():
    text = (LOCAL / "sinfo-busy.txt").read_text()
    run = FakeRun((0, text, ""))
    assert discover(run=run) == parse_sinfo(text)
    argv, kwargs = run.calls[0]
    assert argv == list(SINFO_ARGV) and kwargs["capture_output"] and kwargs["text"] and kwargs["timeout"]
    import hpc.cluster
    assert SINFO_COMMAND in hpc.cluster.__doc__  # the command users are told to run is the one discover runs


def test_discover_falls_back_without_statecomplete():
    lines = (LOCAL / "sinfo-busy.txt").read_text().splitlines()
    old = "\n".join("|".join(c for i, c in enumerate(line.split("|")) if i != 3) for line in lines)
    run = FakeRun((1, "", "sinfo: error: Invalid node format specification: StateComplete"), (0, old, ""))
    c = discover(run=run)
    assert "StateComplete" not in run.calls[1][0][-1] and "StateLong" in run.calls[1][0][-1]
    assert c.node("h800-2").state == NodeState("draining", frozenset({"drain"}))


@pytest.mark.parametrize("result, match", [
    (FileNotFoundError("sinfo"), "sinfo not found.*--cluster-file"),
    (subprocess.TimeoutExpired("sinfo", 60), "did not answer.*scontrol ping"),
    ((1, "", "slurm_load_partitions: Unable to contact slurm controller (connect failure)\n"),
     r"exit 1\): slurm_load_partitions: Unable to contact"),
])
def test_discover_errors(result, match):
    with pytest.raises(ClusterError, match=match):
        discover(run=FakeRun(result))


def test_cluster_module_does_not_import_torch():
    code = "import sys, hpc.cluster; assert 'torch' not in sys.modules and 'grpo' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])
