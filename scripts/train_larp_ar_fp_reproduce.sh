#!/usr/bin/env bash
# The Kinetics-600 frame-prediction NAR run on one 8-GPU node (global batch 64 = 8 per GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
TOKENIZER=${TOKENIZER:-hywang66/LARP-L-long-tokenizer}
# Pre-flight: config, CSVs, videos, tokenizer and resume checkpoint checked once, so a problem is one
# line here instead of a traceback from every process.
python train.py --check 8 --cfg cfgs/larp_ar_fp.yaml --manualSeed 66667 --tag reproduce \
  --csv_file k600_train --out_path save/ --name larp_ar_fp_reproduce -b 64 -j 8 --frame_num 16 \
  --input_size 128 --opts model.name llama-abs-L optimizer.args.lr 0.0006 vae.checkpoint "$TOKENIZER" "$@"
torchrun --nnodes=1 --nproc_per_node=8 train.py --cfg cfgs/larp_ar_fp.yaml --manualSeed 66667 --tag reproduce \
  --csv_file k600_train --out_path save/ --name larp_ar_fp_reproduce -b 64 -j 8 --frame_num 16 \
  --input_size 128 --opts model.name llama-abs-L optimizer.args.lr 0.0006 vae.checkpoint "$TOKENIZER" "$@"
