#!/usr/bin/env bash
# The test command: installs what the tests need on a fresh machine, then runs every test.
# Usage: bash tests/run.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}

# torch 2.13.0: on this project's CPU machines the CPU build comes from local disk; the range in setup.py admits it.
"$PYTHON" -m pip install -q --disable-pip-version-check torch==2.13.0 -e ".[dev]"

# A real local Slurm cluster for tests/slurm (slurm/start-cluster.sh installs slurm-wlm, munge, slurmdbd and MariaDB
# with apt-get when they are missing; it needs root). Stopped on exit whatever happens; after a failure its folder
# (logs) is kept. HPC_TEST_SLURM=0 runs without it: tests/slurm then skip, or fail under CI=true.
if [ "${HPC_TEST_SLURM:-1}" = 1 ] && [ "$(id -u)" = 0 ]; then
  trap 'rc=$?; KEEP_DIR=$([ "$rc" = 0 ] && echo 0 || echo 1) bash slurm/stop-cluster.sh' EXIT
  bash slurm/start-cluster.sh
  source slurm/env.sh  # exports SLURM_CONF for sinfo, sbatch, sacct (and submitit) in the tests
else
  echo "note: not starting the local Slurm cluster (needs root; HPC_TEST_SLURM=${HPC_TEST_SLURM:-1})" >&2
fi

set +e
"$PYTHON" -m pytest -p no:cacheprovider -ra "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "error: pytest collected no tests" >&2
  exit 1
fi
exit "$status"
