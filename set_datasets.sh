#!/usr/bin/env bash
# Link your dataset folders under data/, build data/metadata/*.csv; make_csv checks every listed video exists.
#
#   bash set_datasets.sh --ucf101 /datasets/UCF-101 [--ucf101-splits /datasets/ucfTrainTestlist] [--split 1] \
#                        [--k600 /datasets/kinetics-600]
#
# or edit the variables below (environment variables of the same name work too). Empty = skip that dataset.
set -euo pipefail

UCF101_DIR="${UCF101_DIR:-}"                # folder with the UCF-101 videos (any nesting)
UCF101_SPLITS_DIR="${UCF101_SPLITS_DIR:-}"  # folder with classInd.txt, trainlist0N.txt, testlist0N.txt
UCF101_SPLIT="${UCF101_SPLIT:-1}"           # official split 1, 2 or 3
K600_DIR="${K600_DIR:-}"                    # Kinetics-600 tree: <dir>/train/<class>/<video>, <dir>/val/...

while [[ $# -gt 0 ]]; do
  case "$1" in
    --ucf101) UCF101_DIR="$2"; shift 2 ;;
    --ucf101-splits) UCF101_SPLITS_DIR="$2"; shift 2 ;;
    --split) UCF101_SPLIT="$2"; shift 2 ;;
    --k600) K600_DIR="$2"; shift 2 ;;
    -h|--help) sed -n '2,7p' "$0"; exit 0 ;;
    *) echo "error: unknown argument '$1' (see: bash set_datasets.sh --help)" >&2; exit 2 ;;
  esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"
PYTHON="$ROOT/.venv/bin/python"
[[ -x "$PYTHON" ]] || PYTHON="$(command -v python3)"
mkdir -p data/metadata

if [[ -z "$UCF101_DIR" && -z "$K600_DIR" ]]; then
  echo "error: no dataset folder given: pass --ucf101 DIR and/or --k600 DIR (or set UCF101_DIR / K600_DIR)" >&2
  exit 2
fi

# link NAME DIR: data/NAME -> DIR (replaces an existing link, refuses to replace a real folder)
link() {
  local name="$1" target
  target="$(cd "$2" && pwd)" || { echo "error: dataset folder not found: $2" >&2; exit 1; }
  if [[ -e "data/$name" && ! -L "data/$name" ]]; then
    echo "error: data/$name exists and is not a link; move it away first" >&2; exit 1
  fi
  ln -sfn "$target" "data/$name"
  echo "data/$name -> $target"
}

if [[ -n "$UCF101_DIR" ]]; then
  link ucf101 "$UCF101_DIR"
  SPLIT_ARGS=()
  if [[ -n "$UCF101_SPLITS_DIR" ]]; then
    link ucf101_splits "$UCF101_SPLITS_DIR"
    SPLIT_ARGS=(--splits-dir data/ucf101_splits)
  fi
  "$PYTHON" -m larp.data.make_csv ucf101 --root data/ucf101 "${SPLIT_ARGS[@]}" --split "$UCF101_SPLIT"
fi
if [[ -n "$K600_DIR" ]]; then
  link k600 "$K600_DIR"
  "$PYTHON" -m larp.data.make_csv k600 --root data/k600
fi
