#!/usr/bin/env bash
# The hywang66/LARP-L-long-AR-FP release recipe (the reference's scripts/train_larp_ar_fp_reproduce.sh): the raster
# LP generator for Kinetics-600 frame prediction (5 conditioning frames), global batch 64, 75 epochs; everything
# else is in cfgs/larp_ar_fp.yaml. One 8-GPU node. TOKENIZER and extra arguments as in train_larp_ar_reproduce.sh.
source "$(dirname "$0")/launch.sh"
launch 8 --cfg cfgs/larp_ar_fp.yaml --tag reproduce --name larp_ar_fp_reproduce \
  --opts model.name llama-abs-LP model.order raster vae.checkpoint "${TOKENIZER:-hywang66/LARP-L-long-tokenizer}" "$@"
