#!/usr/bin/env bash
# The one torchrun launcher behind scripts/train_*.sh. A recipe script sources it and calls
#   launch NPROC_PER_NODE <train.py arguments>
# which checks the run once (`python train.py --check`, counting the processes of every node: a problem is one line
# here instead of a traceback from every process), then starts torchrun on this node.
# Multi-node: run the recipe once per node with NNODES and MASTER_ADDR (the address of a node that hosts the
# rendezvous; node ranks are assigned there, so NODE_RANK is not needed) set; MASTER_PORT defaults to 29500. The
# defaults launch one node.
# Restarts: when a worker dies (killed, out of memory), torchrun stops the others and starts them all again, on
# every node, up to MAX_RESTARTS times (default 3; 0 turns it off); they resume from <run>/ckpt_latest.pth. The c10d
# rendezvous gives each attempt a fresh store: the store the agent shares with its workers by default hands a
# restarted attempt the previous one's addresses and hangs it (pytorch/pytorch#135712; seen with torch 2.14).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

launch() {
  local nproc="$1" nnodes="${NNODES:-1}"
  shift
  python train.py --check "$((nproc * nnodes))" "$@"
  TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --nnodes="$nnodes" --nproc_per_node="$nproc" \
    --rdzv-backend=c10d --rdzv-endpoint="${MASTER_ADDR:-127.0.0.1}:${MASTER_PORT:-29500}" --rdzv-id=larp \
    --max-restarts="${MAX_RESTARTS:-3}" train.py "$@"
}
