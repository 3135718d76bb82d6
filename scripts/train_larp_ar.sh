#!/usr/bin/env bash
# Train the class-conditional NAR generator (llama-abs-L) on UCF-101 with a frozen LARP tokenizer.
# TOKENIZER: hub id, hub-mixin folder (e.g. save/larp_tokenizer/export) or training checkpoint; extra
# arguments are more --opts pairs (e.g. train.max_steps 1000).
set -euo pipefail
cd "$(dirname "$0")/.."
# multi-node: run this script once per node with NNODES, NODE_RANK (0..NNODES-1) and MASTER_ADDR (node 0's
# address) set; the defaults launch one node.
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
TOKENIZER=${TOKENIZER:-hywang66/LARP-L-long-tokenizer}
NPROC=${NPROC:-4}
# Pre-flight: config, CSVs, videos, tokenizer and resume checkpoint checked once, so a problem is one
# line here instead of a traceback from every process.
python train.py --check "$((NPROC * NNODES))" --cfg cfgs/larp_ar.yaml --manualSeed 66667 --tag default \
  --csv_file ucf101_train.csv --out_path save/ --name larp_ar -b 64 -j 8 --frame_num 16 --input_size 128 \
  --opts model.name llama-abs-L optimizer.args.lr 0.0006 vae.checkpoint "$TOKENIZER" "$@"
torchrun --nnodes="$NNODES" --node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" \
  --nproc_per_node="$NPROC" train.py --cfg cfgs/larp_ar.yaml --manualSeed 66667 --tag default \
  --csv_file ucf101_train.csv --out_path save/ --name larp_ar -b 64 -j 8 --frame_num 16 --input_size 128 \
  --opts model.name llama-abs-L optimizer.args.lr 0.0006 vae.checkpoint "$TOKENIZER" "$@"
