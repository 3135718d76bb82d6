#!/usr/bin/env bash
# Create or update .venv and install this project into it (`pip install -e .`: the `larp` package plus
# requirements.txt). Sourced by test.sh and quickstart.sh.
# A stamp (hash of requirements.txt + pyproject.toml) makes a second run skip pip entirely.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.requirements.sha256"
WANT="$(cat "$ROOT/requirements.txt" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  echo "[setup] installing the project into $VENV (first run can take several minutes)"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$ROOT" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
  echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
