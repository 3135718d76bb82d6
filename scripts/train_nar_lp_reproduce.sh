#!/usr/bin/env bash
# The NAR-LP recipe (ThisisBillhe/NAR NAR-videos/scripts/train_larp_ar_reproduce.sh, whose model code is NAR): the
# NAR LP generator, global batch 64, 3000 epochs of UCF-101 train, on one 8-GPU node; the rest is in
# cfgs/larp_ar.yaml. TOKENIZER and extra arguments as in train_larp_ar_reproduce.sh.
source "$(dirname "$0")/launch.sh"
launch 8 --cfg cfgs/larp_ar.yaml --tag reproduce --name nar_lp_reproduce -b 64 \
  --opts model.name llama-abs-LP train.epochs 3000 vae.checkpoint "${TOKENIZER:-hywang66/LARP-L-long-tokenizer}" "$@"
