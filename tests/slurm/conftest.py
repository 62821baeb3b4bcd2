"""Tests against a real Slurm cluster: the local one from slurm/start-cluster.sh (tests/run.sh starts it when run as
root). Skipped when no cluster answers `scontrol ping`; with CI=true that is an error instead, so a broken cluster
cannot pass unnoticed."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from hpc.cluster import Cluster, discover

# Slurm's clients find the local cluster through SLURM_CONF (slurm/env.sh); set it here too, so that a plain
# `pytest tests/slurm` works beside a running local cluster.
if "SLURM_CONF" not in os.environ:
    _conf = Path(os.environ.get("HPC_SLURM_DIR", "/tmp/hpc-grpo-slurm")) / "etc" / "slurm.conf"
    if _conf.is_file():
        os.environ["SLURM_CONF"] = str(_conf)


def _why_no_cluster() -> str | None:
    if shutil.which("scontrol") is None:
        return "scontrol not found"
    try:
        p = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "scontrol ping did not answer in 20 s"
    if p.returncode != 0 or " is UP" not in p.stdout:
        return "scontrol ping: " + " ".join((p.stdout + p.stderr).split())[:200]
    return None


@pytest.fixture(scope="session", autouse=True)
def slurm_cluster() -> Cluster:
    """The live cluster as discover() sees it at the start of the session."""
    why = _why_no_cluster()
    if why:
        msg = f"no Slurm cluster ({why}); start the local one: bash slurm/start-cluster.sh && source slurm/env.sh"
        if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
            pytest.fail(f"CI=true and {msg}", pytrace=False)
        pytest.skip(msg)
    return discover()
