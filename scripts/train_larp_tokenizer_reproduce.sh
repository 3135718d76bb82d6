#!/usr/bin/env bash
# The tokenizer run on one 8-GPU node (global batch 64 = 8 per GPU). Resumes automatically.
set -euo pipefail
cd "$(dirname "$0")/.."
# Pre-flight: config, CSVs, videos, tokenizer and resume checkpoint checked once, so a problem is one
# line here instead of a traceback from every process.
python train.py --check 8 --cfg cfgs/larp_tokenizer.yaml --manualSeed 66667 --tag reproduce \
  --csv_file k600_train+ucf101_train --out_path save/ --name larp_tokenizer_reproduce -b 64 -j 8 \
  --frame_num 16 --input_size 128 "$@"
torchrun --nnodes=1 --nproc_per_node=8 train.py --cfg cfgs/larp_tokenizer.yaml --manualSeed 66667 --tag reproduce \
  --csv_file k600_train+ucf101_train --out_path save/ --name larp_tokenizer_reproduce -b 64 -j 8 \
  --frame_num 16 --input_size 128 "$@"
