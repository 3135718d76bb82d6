#!/usr/bin/env bash
# The offline quickstart: set up .venv if needed, then run every stage (see larp/quickstart/run.py).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
python -m larp.quickstart "$@"
