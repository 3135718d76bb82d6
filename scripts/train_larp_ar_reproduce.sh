#!/usr/bin/env bash
# The hywang66/LARP-L-long-AR release recipe (the reference's scripts/train_larp_ar_reproduce.sh): the raster
# (next-token) LP generator, 632M parameters, global batch 64, 3000 epochs of UCF-101 train; everything else is in
# cfgs/larp_ar.yaml. One 8-GPU node. TOKENIZER: the frozen tokenizer (hub id, folder or checkpoint); extra
# arguments are more --opts pairs. tests/test_recipes.py checks the resolved config against the reference's.
source "$(dirname "$0")/launch.sh"
launch 8 --cfg cfgs/larp_ar.yaml --tag reproduce --name larp_ar_reproduce -b 64 \
  --opts model.name llama-abs-LP model.order raster train.epochs 3000 \
  vae.checkpoint "${TOKENIZER:-hywang66/LARP-L-long-tokenizer}" "$@"
