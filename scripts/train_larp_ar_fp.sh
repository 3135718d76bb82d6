#!/usr/bin/env bash
# Train the frame-prediction NAR generator on Kinetics-600 (5 conditioning frames) with a frozen LARP tokenizer.
# TOKENIZER as in train_larp_ar.sh; extra arguments are more --opts pairs.
set -euo pipefail
cd "$(dirname "$0")/.."
TOKENIZER=${TOKENIZER:-hywang66/LARP-L-long-tokenizer}
NPROC=${NPROC:-4}
# Pre-flight: config, CSVs, videos, tokenizer and resume checkpoint checked once, so a problem is one
# line here instead of a traceback from every process.
python train.py --check "$NPROC" --cfg cfgs/larp_ar_fp.yaml --manualSeed 66667 \
  --tag default --csv_file k600_train --out_path save/ --name larp_ar_fp -b 64 -j 8 --frame_num 16 \
  --input_size 128 --opts model.name llama-abs-L optimizer.args.lr 0.0006 vae.checkpoint "$TOKENIZER" "$@"
torchrun --nnodes=1 --nproc_per_node="$NPROC" train.py --cfg cfgs/larp_ar_fp.yaml --manualSeed 66667 \
  --tag default --csv_file k600_train --out_path save/ --name larp_ar_fp -b 64 -j 8 --frame_num 16 \
  --input_size 128 --opts model.name llama-abs-L optimizer.args.lr 0.0006 vae.checkpoint "$TOKENIZER" "$@"
