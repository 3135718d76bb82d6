#!/usr/bin/env bash
# The UCF-101 class-conditional NAR run on one 8-GPU node (global batch 64 = 8 per GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
# multi-node: run this script once per node with NNODES, NODE_RANK (0..NNODES-1) and MASTER_ADDR (node 0's
# address) set; the defaults launch one node.
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
TOKENIZER=${TOKENIZER:-hywang66/LARP-L-long-tokenizer}
# Pre-flight: config, CSVs, videos, tokenizer and resume checkpoint checked once, so a problem is one
# line here instead of a traceback from every process.
python train.py --check "$((8 * NNODES))" --cfg cfgs/larp_ar.yaml --manualSeed 66667 --tag reproduce \
  --csv_file ucf101_train.csv --out_path save/ --name larp_ar_reproduce -b 64 -j 8 --frame_num 16 \
  --input_size 128 --opts model.name llama-abs-L optimizer.args.lr 0.0006 vae.checkpoint "$TOKENIZER" "$@"
torchrun --nnodes="$NNODES" --node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" \
  --nproc_per_node=8 train.py --cfg cfgs/larp_ar.yaml --manualSeed 66667 --tag reproduce \
  --csv_file ucf101_train.csv --out_path save/ --name larp_ar_reproduce -b 64 -j 8 --frame_num 16 \
  --input_size 128 --opts model.name llama-abs-L optimizer.args.lr 0.0006 vae.checkpoint "$TOKENIZER" "$@"
