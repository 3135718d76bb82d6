#!/usr/bin/env bash
# Train the LARP-L-long tokenizer on K600 + UCF-101 (16 x 128 x 128 clips -> 1024 tokens).
# NPROC processes on this node; -b is the global batch. Resumes from save/larp_tokenizer/ckpt_latest.pth.
# Extra arguments go to train.py (e.g. --replace, or --opts train.max_steps 1000).
set -euo pipefail
cd "$(dirname "$0")/.."
# multi-node: run this script once per node with NNODES, NODE_RANK (0..NNODES-1) and MASTER_ADDR (node 0's
# address) set; the defaults launch one node.
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
NPROC=${NPROC:-4}
# Pre-flight: config, CSVs, videos, tokenizer and resume checkpoint checked once, so a problem is one
# line here instead of a traceback from every process.
python train.py --check "$((NPROC * NNODES))" --cfg cfgs/larp_tokenizer.yaml --manualSeed 66667 \
  --tag default --csv_file k600_train+ucf101_train --out_path save/ --name larp_tokenizer -b 64 -j 8 \
  --frame_num 16 --input_size 128 "$@"
torchrun --nnodes="$NNODES" --node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" \
  --nproc_per_node="$NPROC" train.py --cfg cfgs/larp_tokenizer.yaml --manualSeed 66667 \
  --tag default --csv_file k600_train+ucf101_train --out_path save/ --name larp_tokenizer -b 64 -j 8 \
  --frame_num 16 --input_size 128 "$@"
