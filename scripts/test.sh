#!/usr/bin/env bash
# The test command: set up .venv if needed, then run the whole CPU test suite.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
python -m pytest -q tests "$@"
