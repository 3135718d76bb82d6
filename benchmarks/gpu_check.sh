#!/usr/bin/env bash
# The ready CUDA check (see benchmarks/gpu_check.py): one command, one GPU, under 8 minutes.
#   PYTHON=python3 bash benchmarks/gpu_check.sh --out gpu_check_out   # writes gpu_check.json + gpu_check.md there
#   bash benchmarks/gpu_check.sh --device cpu --tiny                   # tiny CPU fallback of every section (CI)
# Uses $PYTHON (default: python3) as it is; installs nothing.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
