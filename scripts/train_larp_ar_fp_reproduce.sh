#!/usr/bin/env bash
# The Kinetics-600 frame-prediction NAR run on 8-GPU nodes (global batch 64 = 8 per GPU on one node).
source "$(dirname "$0")/launch.sh"
launch 8 --cfg cfgs/larp_ar_fp.yaml --manualSeed 66667 --tag reproduce --name larp_ar_fp_reproduce \
  --opts vae.checkpoint "${TOKENIZER:-hywang66/LARP-L-long-tokenizer}" "$@"
