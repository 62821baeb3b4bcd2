"""Slurm cluster discovery: partitions, nodes, GPUs and node states from `sinfo`.

`discover()` runs one `sinfo` command on the login node and parses it; `parse_sinfo(text)` parses the same output
saved to a file, so a plan can be made on a machine without Slurm. To save it on a login node run

    sinfo -N -S '#P,N' -O 'NodeList:0|,Partition:0|,StateLong:0|,StateComplete:0|,Gres:0|,GresUsed:0|,CPUs:0|,Memory:0|,Available:0|,Time:0|,Reason:0' > cluster.txt

and pass `--cluster-file cluster.txt` (read by `load_cluster_file`). The header line names the columns, so the
parser finds them by name; outputs of other `sinfo -o/-O` formats with a header are read too, as far as they go
(`NODELIST` and `PARTITION` are required; partition-oriented lines such as plain `sinfo` output are expanded with
`expand_nodelist`; a missing GRES column means no GPUs). Partitions without nodes and hidden partitions are not
listed: sinfo leaves them out.

The pure parsers (`expand_nodelist`, `parse_gres`, `parse_node_state`, `parse_timelimit`) follow Slurm's own
syntax; tests/fixtures/ holds real outputs they are checked against. Standard library only: the login-node command
imports this module.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "ClusterError", "NodeState", "Node", "Partition", "Cluster", "SINFO_FIELDS", "SINFO_ARGV", "discover",
    "parse_sinfo", "load_cluster_file", "expand_nodelist", "parse_gres", "parse_node_state", "parse_timelimit",
]

SINFO_FIELDS = ("NodeList", "Partition", "StateLong", "StateComplete", "Gres", "GresUsed", "CPUs", "Memory",
                "Available", "Time", "Reason")
# ":0" = no width limit (sinfo -O truncates at 20 characters by default); "|" ends every field but the last, so a
# reason text may hold anything.
# -N: one line per node and partition; -S '#P,N': partitions in slurm.conf's order, then nodes by name.
SINFO_ARGV = ("sinfo", "-N", "-S", "#P,N", "-O",
              ",".join(f"{f}:0|" for f in SINFO_FIELDS[:-1]) + f",{SINFO_FIELDS[-1]}:0")
SINFO_COMMAND = shlex.join(SINFO_ARGV)


class ClusterError(ValueError):
    """The cluster could not be read, or a saved cluster file is not what `parse_sinfo` expects."""


# ----------------------------------------------------------------------------------------------- node states

# sinfo's state suffixes (man sinfo, NODE STATE CODES)
_SUFFIX_FLAGS = {
    "*": "not_responding", "~": "powered_down", "#": "powering_up", "!": "power_down", "%": "powering_down",
    "$": "maint", "@": "reboot_requested", "^": "reboot_issued", "-": "planned", "+": "completing",
}
# base token (compact, long or scontrol spelling, lower case) -> (sinfo's long name, flags it implies)
_BASES: dict[str, tuple[str, tuple[str, ...]]] = {}
for _names, _long, _flags in [
    (("idle",), "idle", ()),
    (("alloc", "allocated"), "allocated", ()),
    (("mix", "mixed"), "mixed", ()),
    (("down",), "down", ()),
    (("drain", "drained"), "drained", ("drain",)),
    (("drng", "draining"), "draining", ("drain",)),
    (("comp", "completing"), "completing", ("completing",)),
    (("fail",), "fail", ("fail",)),
    (("failg", "failing"), "failing", ("fail",)),
    (("maint", "maintenance"), "maint", ("maint",)),
    (("resv", "reserved"), "reserved", ("reserved",)),
    (("plnd", "planned"), "planned", ("planned",)),
    (("boot", "reboot"), "reboot", ("reboot_requested",)),
    (("reboot_requested",), "reboot_requested", ("reboot_requested",)),
    (("reboot_issued",), "reboot_issued", ("reboot_issued",)),
    (("pow_dn", "power_down"), "power_down", ("power_down",)),
    (("powered_down",), "powered_down", ("powered_down",)),
    (("powering_down",), "powering_down", ("powering_down",)),
    (("pow_up", "power_up", "powering_up"), "powering_up", ("powering_up",)),
    (("futr", "future"), "future", ()),
    (("unk", "unknown"), "unknown", ()),
    (("inval", "invalid"), "inval", ()),
    (("npc", "perfctrs"), "perfctrs", ("perfctrs",)),
    (("err", "error"), "error", ()),
    (("blocked", "block"), "blocked", ()),
    (("cloud",), "cloud", ("cloud",)),
    (("resm", "resume"), "resume", ()),
    (("canc_r", "cancel_reboot"), "cancel_reboot", ()),
]:
    for _n in _names:
        _BASES[_n] = (_long, _flags)

# flag words after "+" in scontrol's State= and sinfo's StateComplete (IDLE+DRAIN, idle+cloud+powered_down)
_FLAG_WORDS = {
    "drain": "drain", "completing": "completing", "not_responding": "not_responding", "no_respond": "not_responding",
    "powered_down": "powered_down", "power": "powered_down", "power_down": "power_down",
    "powering_down": "powering_down", "powering_up": "powering_up", "power_up": "powering_up",
    "maint": "maint", "maintenance": "maint", "reboot_requested": "reboot_requested", "reboot": "reboot_requested",
    "reboot_issued": "reboot_issued", "planned": "planned", "reserved": "reserved", "resv": "reserved",
    "fail": "fail", "cloud": "cloud", "perfctrs": "perfctrs", "npc": "perfctrs",
}
# flags that do not keep an idle node from taking a job now; any other flag (known or not) does
_HARMLESS = frozenset({"cloud", "dynamic_norm"})
# (flag or state name, reason) in the order a reason is picked when several apply: first what takes a node out of
# service, then "busy" for nodes running jobs, then what keeps an idle node from new jobs for a while
_REASONS_OUT = (
    ("fail", "failing"), ("down", "down"), ("drain", None), ("not_responding", "not responding"),
    ("maint", "maintenance"), ("reboot_requested", "reboot pending"), ("reboot_issued", "rebooting"),
    ("powering_up", "powering up"), ("powering_down", "powering down"), ("powered_down", "powered down"),
    ("power_down", "powering down"),
)
_REASONS_IDLE = (("reserved", "reserved"), ("planned", "planned"), ("completing", "completing"), ("perfctrs", "busy"))


@dataclass(frozen=True)
class NodeState:
    """A node's state: `name` is sinfo's long state name (idle, mixed, drained, ...), `flags` its state flags."""

    name: str
    flags: frozenset[str] = frozenset()

    @property
    def available(self) -> bool:
        """True when the node is idle and nothing (drain, maintenance, power saving, reboot, ...) holds it back.

        Mixed and allocated nodes are busy: a job that wants whole nodes would wait for them. Powered-down idle
        nodes (`idle~`) count as unavailable too: Slurm boots them on demand, which takes minutes.
        """
        return self.name == "idle" and self.flags <= _HARMLESS

    def reason(self) -> str:
        """A short word for why the node is not available ("drained", "down", "busy", ...); "available" if it is."""
        if self.available:
            return "available"
        has = self.flags | {self.name}
        for key, word in _REASONS_OUT:
            if key in has:
                if key == "drain":
                    return "draining" if self.name in ("draining", "allocated", "mixed", "completing") else "drained"
                return word
        if self.name in ("allocated", "mixed"):
            return "busy"
        for key, word in _REASONS_IDLE:
            if key in has:
                return word
        if self.name == "idle":  # idle with a flag this module does not know
            return sorted(self.flags - _HARMLESS)[0].replace("_", " ")
        return self.name.replace("_", " ")


def parse_node_state(token: str) -> NodeState:
    """Parse a node state as sinfo (`idle~`, `drng`, `alloc*`, `drained`, `allocated+`, `idle+drain`) or scontrol
    (`IDLE+DRAIN`, `MIXED+COMPLETING`, `DOWN+NOT_RESPONDING`) prints it.

    `name` is the long form of the base state (`drng` -> "draining"; scontrol's `IDLE+DRAIN` -> "idle"), `flags`
    the state flags from the suffix characters, the `+FLAG` words and the base state itself (drained -> drain).
    Unknown flag words are kept as they are (lower case), and make the node unavailable.
    """
    text = token.strip().lower()
    if not text:
        raise ValueError("empty node state")
    flags: set[str] = set()
    while text and text[-1] in _SUFFIX_FLAGS:
        flags.add(_SUFFIX_FLAGS[text[-1]])
        text = text[:-1]
    base, *words = text.split("+")
    if base not in _BASES:
        raise ValueError(f"unknown Slurm node state {token!r}")
    name, implied = _BASES[base]
    flags.update(implied)
    for word in words:
        if word:
            flags.add(_FLAG_WORDS.get(word, word))
    return NodeState(name, frozenset(flags))


# ---------------------------------------------------------------------------------------------- data model

@dataclass(frozen=True)
class Node:
    """One node as Slurm reports it. `gpus` maps GPU type (None when untyped) to count; `partitions` lists every
    partition the node is in; `reason_text` is the administrator's reason for a down or drained node."""

    name: str
    state: NodeState
    gpus: dict[str | None, int]
    cpus: int
    memory_mb: int
    partitions: tuple[str, ...]
    gpus_used: int = 0
    reason_text: str = ""

    @property
    def gpu_type(self) -> str | None:
        """The node's GPU type when all its GPUs have one type name; None for no GPUs, untyped or mixed types."""
        types = [t for t, n in self.gpus.items() if n > 0]
        return types[0] if len(types) == 1 else None

    @property
    def num_gpus(self) -> int:
        return sum(self.gpus.values())

    @property
    def num_free_gpus(self) -> int:
        return max(0, self.num_gpus - self.gpus_used)


@dataclass(frozen=True)
class Partition:
    """A partition: `state` is "up", "down", "drain" or "inactive"; `timelimit_s` None for no limit."""

    name: str
    default: bool
    state: str
    timelimit_s: int | None
    nodes: tuple[str, ...]


@dataclass(frozen=True)
class Cluster:
    """Partitions (in slurm.conf's order) and nodes (each once, with every partition it is in)."""

    partitions: tuple[Partition, ...]
    nodes: tuple[Node, ...]
    _by_name: dict = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "_by_name", {n.name: n for n in self.nodes})
        missing = {n for p in self.partitions for n in p.nodes} - self._by_name.keys()
        assert not missing, f"partitions list nodes that are not in Cluster.nodes: {sorted(missing)}"

    def partition(self, name: str) -> Partition:
        """The partition called `name`; ClusterError naming the partitions there are if there is none."""
        for p in self.partitions:
            if p.name == name:
                return p
        raise ClusterError(f"no partition {name!r} on this cluster; partitions: "
                           f"{', '.join(p.name for p in self.partitions) or '(none)'}")

    def nodes_in(self, partition: str | Partition) -> tuple[Node, ...]:
        """The nodes of a partition (by name or Partition), in sinfo's order."""
        p = self.partition(partition) if isinstance(partition, str) else partition
        return tuple(self._by_name[n] for n in p.nodes)

    def node(self, name: str) -> Node:
        try:
            return self._by_name[name]
        except KeyError:
            raise ClusterError(f"no node {name!r} on this cluster") from None

    @property
    def default_partition(self) -> Partition | None:
        return next((p for p in self.partitions if p.default), None)

    def describe(self) -> str:
        """One line per partition: state, time limit, nodes available/total, GPU types and counts per node."""
        lines = []
        for p in self.partitions:
            nodes = self.nodes_in(p)
            gpus = sorted({f"{n.gpu_type or 'gpu'}:{n.num_gpus}" for n in nodes if n.num_gpus})
            limit = "no limit" if p.timelimit_s is None else _format_seconds(p.timelimit_s)
            lines.append(f"{p.name}{'*' if p.default else ''}: {p.state}, {limit}, "
                         f"{sum(n.state.available for n in nodes)}/{len(nodes)} nodes available, "
                         f"{', '.join(gpus) if gpus else 'no GPUs'}")
        return "\n".join(lines)


def _format_seconds(s: int) -> str:
    d, s = divmod(s, 86400)
    return (f"{d}-" if d else "") + f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


# ------------------------------------------------------------------------------------------ pure parsers

def expand_nodelist(text: str) -> list[str]:
    """Expand a Slurm hostlist into host names, in order: `gpu[001-003,010],cpu1` -> gpu001 gpu002 gpu003 gpu010
    cpu1; several bracket groups expand as a product (`a[1-2]-b[3,5]` -> a1-b3 a1-b5 a2-b3 a2-b5); a range keeps the
    zero padding of its first number. Empty text, "(null)" and "n/a" give []."""
    text = text.strip()
    if text.lower() in ("", "(null)", "n/a", "none"):
        return []
    names: list[str] = []
    for item in _split_top(text, ",", "[]"):
        if item:
            names.extend(_expand_one(item, text, MAX_HOSTS - len(names)))
    return names


# More host names than any cluster has: a hostlist beyond it (a typo such as h800-[1-99999999] in a saved sinfo
# file) is refused before it is expanded, instead of filling the memory.
MAX_HOSTS = 100_000


def _split_top(text: str, sep: str, brackets: str) -> list[str]:
    """Split at `sep` outside brackets (brackets = opening and closing character)."""
    parts, depth, start = [], 0, 0
    for i, c in enumerate(text):
        if c == brackets[0]:
            depth += 1
        elif c == brackets[1]:
            depth -= 1
        elif c == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts]


def _expand_one(item: str, whole: str, room: int) -> list[str]:
    pieces = re.split(r"(\[[^\[\]]*\])", item)
    if any(c in p for p in pieces[::2] for c in "[]"):
        raise ValueError(f"bad Slurm hostlist {whole!r}: unbalanced brackets in {item!r}")
    count = 1
    for piece in pieces[1::2]:  # count the product before building it
        count *= sum(_range_size(r, whole) for r in piece[1:-1].split(","))
    if count > room:
        raise ValueError(f"Slurm hostlist {whole!r} names more than {MAX_HOSTS} hosts; is it mistyped?")
    out = [""]
    for i, piece in enumerate(pieces):
        options = _expand_range_list(piece[1:-1], whole) if i % 2 else [piece]
        out = [prefix + o for prefix in out for o in options]
    return out


def _range_size(r: str, whole: str) -> int:
    m = re.fullmatch(r"\s*(\d+)(?:-(\d+))?\s*", r)
    if not m:
        raise ValueError(f"bad Slurm hostlist {whole!r}: {r!r} is not a number or a range like 01-10")
    return max(1, int(m.group(2) or m.group(1)) - int(m.group(1)) + 1)


def _expand_range_list(body: str, whole: str) -> list[str]:
    values = []
    for r in body.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:-(\d+))?\s*", r)
        if not m:
            raise ValueError(f"bad Slurm hostlist {whole!r}: {r!r} is not a number or a range like 01-10")
        lo, hi = m.group(1), m.group(2) if m.group(2) is not None else m.group(1)
        if int(hi) < int(lo):
            raise ValueError(f"bad Slurm hostlist {whole!r}: range {r!r} runs backwards")
        values.extend(str(v).zfill(len(lo)) for v in range(int(lo), int(hi) + 1))
    return values


_COUNT = re.compile(r"(\d+)([kmgtp]?)", re.IGNORECASE)


def parse_gres(text: str) -> dict[str | None, int]:
    """GPUs in a GRES string, by type: `gpu:h100:8(S:0-1),shard:2` -> {"h100": 8}; `gpu:4` -> {None: 4};
    `(null)` -> {}. Entries of one type add up; other GRES (shard, mps, ...) and the `(S:...)`/`(IDX:...)` parts
    are ignored. Also reads sinfo's GresUsed (`gpu:h100:3(IDX:0-2)`) and TRES spellings (`gres/gpu:h100=2`)."""
    text = text.strip()
    gpus: dict[str | None, int] = {}
    if text.lower() in ("", "(null)", "n/a", "none"):
        return gpus
    for entry in _split_top(text, ",", "()"):
        entry = re.sub(r"\([^()]*\)$", "", entry).strip()  # (S:0-1), (IDX:0,3), (IDX:N/A)
        if entry.startswith("gres/"):
            entry = entry[5:].replace("=", ":")
        parts = entry.split(":")
        if parts[0] != "gpu":
            continue
        rest = [p for p in parts[1:] if p.lower() != "no_consume"]
        count = 1
        if rest and _COUNT.fullmatch(rest[-1]):
            m = _COUNT.fullmatch(rest.pop())  # a K/M/G/T/P suffix multiplies by powers of 1024 (gres.conf)
            count = int(m.group(1)) * 1024 ** ("kmgtp".index(m.group(2).lower()) + 1 if m.group(2) else 0)
        if len(rest) > 1:
            raise ValueError(f"bad GRES entry {entry!r} in {text!r}: expected gpu[:type][:count]")
        gtype = rest[0] if rest and rest[0] not in ("", "(null)") else None
        gpus[gtype] = gpus.get(gtype, 0) + count
    return gpus


def parse_timelimit(text: str) -> int | None:
    """Seconds in a Slurm time limit; None for infinite/UNLIMITED. Formats as in sbatch --time: `M`, `M:S`,
    `H:M:S`, `D-H`, `D-H:M`, `D-H:M:S` (so `30:00` is 30 minutes, `5` is 5 minutes, `1-0` one day). Slurm keeps
    limits in whole minutes and rounds seconds up (`0:30` -> 60), and so does this."""
    t = text.strip().lower()
    if t in ("infinite", "unlimited", "none", "n/a", "not_set"):
        return None
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", t)
    if not m:
        raise ValueError(f"bad Slurm time limit {text!r}: expected minutes, M:S, H:M:S or D-H[:M[:S]]")
    days, a, b, c = m.groups()
    a, b, c = int(a), int(b or 0), int(c or 0)
    if days is not None:  # D-H, D-H:M, D-H:M:S
        seconds = int(days) * 86400 + a * 3600 + b * 60 + c
    elif m.group(4) is not None:  # H:M:S
        seconds = a * 3600 + b * 60 + c
    else:  # M or M:S
        seconds = a * 60 + b
    return -(-seconds // 60) * 60


# -------------------------------------------------------------------------------------- sinfo output

# column header -> key; several headers for one key are tried in order
_COLUMNS = {
    "NODELIST": "nodes", "HOSTNAMES": "nodes", "PARTITION": "partition", "STATE": "state",
    "STATECOMPLETE": "state_complete", "GRES": "gres", "GRES_USED": "gres_used", "CPUS": "cpus",
    "MEMORY": "memory", "AVAIL": "avail", "TIMELIMIT": "timelimit", "REASON": "reason",
}
_PARTITION_STATES = {"up": "up", "down": "down", "drain": "drain", "inact": "inactive", "inactive": "inactive"}


def parse_sinfo(text: str) -> Cluster:
    """Parse sinfo output with a header line (see the module docstring for the command) into a Cluster.

    Columns are found by header name and split at "|" when the header has one, else at white space. A node listed
    under several partitions (one line each with -N) becomes one Node with all of them.
    """
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise ClusterError(f"empty sinfo output; save it on a login node with: {SINFO_COMMAND}")
    header = lines[0]
    sep = "|" if "|" in header else None
    names = [h.strip().upper() for h in (header.split(sep) if sep else header.split())]
    keys = [_COLUMNS.get(h) for h in names]
    if "nodes" not in keys or "partition" not in keys:
        raise ClusterError(f"not sinfo output with a header naming NODELIST and PARTITION (first line: "
                           f"{header[:80]!r}); save it on a login node with: {SINFO_COMMAND}")
    partitions: dict[str, dict] = {}
    nodes: dict[str, dict] = {}
    for lineno, line in enumerate(lines[1:], start=2):
        # only a last REASON column may hold the separator (an administrator's free text)
        limit = len(names) - 1 if keys[-1] == "reason" else -1
        cells = line.split(sep, limit) if sep else line.split(None, limit)
        if len(cells) != len(names):
            raise ClusterError(f"sinfo output line {lineno} has {len(cells)} columns, the header {len(names)}: "
                               f"{line[:80]!r}")
        row = {}
        for k, v in zip(keys, cells):
            if k and k not in row:
                row[k] = v.strip()
        try:
            _add_row(row, partitions, nodes)
        except ValueError as e:
            raise ClusterError(f"sinfo output line {lineno}: {e}") from None
    return Cluster(
        partitions=tuple(Partition(name=n, default=p["default"], state=p["state"], timelimit_s=p["timelimit_s"],
                                   nodes=tuple(p["nodes"])) for n, p in partitions.items()),
        nodes=tuple(Node(name=n, state=d["state"], gpus=d["gpus"], cpus=d["cpus"], memory_mb=d["memory_mb"],
                         partitions=tuple(d["partitions"]), gpus_used=d["gpus_used"], reason_text=d["reason"])
                    for n, d in nodes.items()),
    )


def _add_row(row: dict, partitions: dict, nodes: dict) -> None:
    pname = row["partition"]
    default = pname.endswith("*")
    pname = pname.rstrip("*")
    part = partitions.setdefault(pname, {"default": False, "state": "up", "timelimit_s": None, "nodes": []})
    part["default"] |= default
    if "avail" in row:
        part["state"] = _PARTITION_STATES.get(row["avail"].lower(), row["avail"].lower())
    if "timelimit" in row:
        part["timelimit_s"] = parse_timelimit(row["timelimit"])
    state = _merge_states(row.get("state"), row.get("state_complete"))
    reason = row.get("reason", "")
    for name in expand_nodelist(row["nodes"]):
        if name not in part["nodes"]:
            part["nodes"].append(name)
        node = nodes.get(name)
        if node is None:
            nodes[name] = {
                "state": state, "gpus": parse_gres(row.get("gres", "")), "gpus_used":
                sum(parse_gres(row.get("gres_used", "")).values()), "cpus": _int(row.get("cpus", "0")),
                "memory_mb": _int(row.get("memory", "0")), "partitions": [pname],
                "reason": "" if reason.lower() in ("none", "(null)") else reason,
            }
        elif pname not in node["partitions"]:
            node["partitions"].append(pname)


def _merge_states(long: str | None, complete: str | None) -> NodeState:
    if long is None and complete is None:
        raise ValueError("no STATE column")
    a = parse_node_state(long) if long is not None else None
    b = parse_node_state(complete) if complete is not None else None
    if a and b:
        return NodeState(a.name, a.flags | b.flags)
    return a or b


def _int(text: str) -> int:
    m = re.match(r"\d+", text.strip())  # "191000+" in partition-oriented output: the smallest node's value
    if not m:
        raise ValueError(f"expected a number, got {text!r}")
    return int(m.group())


def load_cluster_file(path: str | Path) -> Cluster:
    """Read a cluster saved with the command in this module's docstring."""
    p = Path(path)
    if not p.is_file():
        raise ClusterError(f"cluster file {str(p)!r} not found; save one on a login node with: {SINFO_COMMAND}")
    return parse_sinfo(p.read_text())


def discover(*, run=subprocess.run, timeout_s: float = 60) -> Cluster:
    """Read the live cluster with sinfo (argv list, fixed format). `run` is subprocess.run or a stand-in with its
    signature. ClusterError with one line saying what to do when sinfo is missing or fails."""
    argv = list(SINFO_ARGV)
    for attempt in range(2):
        try:
            proc = run(argv, capture_output=True, text=True, timeout=timeout_s)
        except FileNotFoundError:
            raise ClusterError("sinfo not found: run this on a Slurm login node, or pass --cluster-file FILE saved "
                               f"there with: {SINFO_COMMAND}") from None
        except subprocess.TimeoutExpired:
            raise ClusterError(f"sinfo did not answer in {timeout_s:.0f} s: is slurmctld up? "
                               "(try `scontrol ping`)") from None
        if proc.returncode == 0:
            return parse_sinfo(proc.stdout)
        err = (proc.stderr or proc.stdout or "").strip().splitlines()
        if attempt == 0 and "statecomplete" in " ".join(err).lower():  # Slurm older than StateComplete
            argv[-1] = argv[-1].replace("StateComplete:0|,", "")
            continue
        break
    raise ClusterError(f"sinfo failed (exit {proc.returncode}): {err[0] if err else 'no message'}")
