#!/usr/bin/env bash
# Link your dataset downloads where the shipped CSVs expect them, then check that every listed video is there.
#
#   bash set_datasets.sh --ucf101 /datasets/UCF-101 [--k600 /datasets/kinetics-dataset/k600]
#
# data/metadata/ ships the reference's lists (ucf101_train.csv, ucf101_val.csv: official split 1; k600_val.csv),
# whose paths are data/ucf101/<Action>/v_*.avi and data/k600/val/<youtube_id>_<start>_<end>.mp4. So:
#   --ucf101 DIR  the official UCF-101/ folder (DIR/<Action>/v_<Action>_gXX_cYY.avi) -> data/ucf101
#   --k600 DIR    the CVDF download (DIR/{train,val}/*.mp4, DIR/annotations/) -> data/k600; k600_train.csv, not
#                 shipped, is built from DIR/train with `python -m larp.data.make_csv k600 --splits train`
# Environment variables UCF101_DIR / K600_DIR work too. Empty = skip that dataset.
set -euo pipefail

UCF101_DIR="${UCF101_DIR:-}"
K600_DIR="${K600_DIR:-}"

while [[ $# -gt 0 ]]; do
  case "$1" in
    --ucf101) UCF101_DIR="$2"; shift 2 ;;
    --k600) K600_DIR="$2"; shift 2 ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
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
  "$PYTHON" -m larp.data.make_csv check data/metadata/ucf101_train.csv data/metadata/ucf101_val.csv
fi
if [[ -n "$K600_DIR" ]]; then
  link k600 "$K600_DIR"
  if [[ -d data/k600/train ]]; then
    "$PYTHON" -m larp.data.make_csv k600 --root data/k600 --splits train
  fi
  "$PYTHON" -m larp.data.make_csv check data/metadata/k600_val.csv
fi
