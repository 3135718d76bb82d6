#!/usr/bin/env bash
# The GPU check (see benchmarks/gpu_check.py): one command on a bare GPU machine, within 8 minutes.
#   bash benchmarks/gpu_check.sh --prepare [--python-version 3.12]   # where pip reaches an index: fill .whl/
#   bash benchmarks/gpu_check.sh [--out DIR] [--sections ...]         # on the GPU machine; --out defaults to $OUT
#   bash benchmarks/gpu_check.sh --device cpu --tiny                  # tiny CPU run of every section
# --prepare downloads the wheels of benchmarks/gpu_check_wheels.txt (for the GPU machine's Python, default 3.12,
# x86_64 Linux) into .whl/. Without it the script installs them from .whl/ with no index into a temporary folder
# (nothing is installed into the machine's Python), then runs the check with $PYTHON (default python3).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
WHEELS="$ROOT/.whl"
LIST="$ROOT/benchmarks/gpu_check_wheels.txt"
if [ "${1:-}" = "--prepare" ]; then
  shift
  PYVER=3.12
  while [ $# -gt 0 ]; do
    case "$1" in
      --python-version) PYVER="${2:?--python-version needs a value such as 3.12}"; shift 2 ;;
      *) echo "gpu_check.sh --prepare: unknown argument '$1' (takes --python-version X.Y)" >&2; exit 2 ;;
    esac
  done
  mkdir -p "$WHEELS"
  # each package: its binary wheel for that Python and x86_64 Linux, else (a pure-Python sdist) a wheel built here
  for req in $(sed -e 's/#.*//' "$LIST"); do
    "$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version "$PYVER" \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --platform manylinux2010_x86_64 -c "$ROOT/constraints.txt" -d "$WHEELS" "$req" 2>/dev/null \
    || "$PY" -m pip wheel -q --disable-pip-version-check --no-deps -c "$ROOT/constraints.txt" -w "$WHEELS" "$req" \
    || { echo "gpu_check.sh --prepare: no wheel for '$req' (Python $PYVER, x86_64 Linux)" >&2; exit 1; }
  done
  echo "[gpu_check] wheels for Python $PYVER in $WHEELS:"
  ls -1 "$WHEELS"
  exit 0
fi
SITE="$(mktemp -d)"
trap 'rm -rf "$SITE"' EXIT
if compgen -G "$WHEELS/*.whl" > /dev/null; then
  echo "[gpu_check] installing $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS into $SITE (no index)"
  "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --find-links "$WHEELS" --target "$SITE" \
    -r "$LIST"
else
  echo "[gpu_check] no wheels in $WHEELS: using the packages this Python has (run --prepare where pip reaches an index)"
fi
export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
"$PY" benchmarks/gpu_check.py "$@"
