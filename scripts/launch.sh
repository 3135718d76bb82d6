#!/usr/bin/env bash
# The one torchrun launcher behind scripts/train_*.sh. A recipe script sources it and calls
#   launch NPROC_PER_NODE <train.py arguments>
# which checks the run once (`python train.py --check`, counting the processes of every node: a problem is one line
# here instead of a traceback from every process), then starts torchrun on this node.
# Multi-node: run the recipe once per node with NNODES, NODE_RANK (0..NNODES-1) and MASTER_ADDR (node 0's address)
# set; MASTER_PORT defaults to 29500. The defaults launch one node.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

launch() {
  local nproc="$1" nnodes="${NNODES:-1}"
  shift
  python train.py --check "$((nproc * nnodes))" "$@"
  torchrun --nnodes="$nnodes" --node_rank="${NODE_RANK:-0}" --master_addr="${MASTER_ADDR:-127.0.0.1}" \
    --master_port="${MASTER_PORT:-29500}" --nproc_per_node="$nproc" train.py "$@"
}
