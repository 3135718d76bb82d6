#!/usr/bin/env bash
# The UCF-101 class-conditional NAR run on 8-GPU nodes (global batch 64 = 8 per GPU on one node).
source "$(dirname "$0")/launch.sh"
launch 8 --cfg cfgs/larp_ar.yaml --manualSeed 66667 --tag reproduce --name larp_ar_reproduce \
  --opts vae.checkpoint "${TOKENIZER:-hywang66/LARP-L-long-tokenizer}" "$@"
