#!/usr/bin/env bash
# The test command: installs what the tests need on a fresh machine, then runs every test.
# Usage: bash tests/run.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}

# torch 2.13.0: on this project's CPU machines the CPU build comes from local disk; the range in setup.py admits it.
"$PYTHON" -m pip install -q --disable-pip-version-check torch==2.13.0 -e ".[dev]"

set +e
"$PYTHON" -m pytest -p no:cacheprovider -ra "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "error: pytest collected no tests" >&2
  exit 1
fi
exit "$status"
