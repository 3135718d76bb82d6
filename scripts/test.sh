#!/usr/bin/env bash
# The test command: set up .venv if needed, then run the whole CPU test suite on every core (pytest-xdist; each
# worker runs its tests on one thread, see tests/conftest.py) and list the ten slowest tests.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
python -m pytest -q -n "${PYTEST_WORKERS:-auto}" --dist worksteal --durations=10 tests "$@"
