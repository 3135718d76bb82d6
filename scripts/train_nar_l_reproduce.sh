#!/usr/bin/env bash
# The NAR-L release recipe (ThisisBillhe/NAR NAR-videos/scripts/train_larp_ar.sh): the NAR L generator, global
# batch 32, 1000 epochs of UCF-101 train, on one 8-GPU node; cfgs/larp_ar.yaml holds every value. TOKENIZER and
# extra arguments as in train_larp_ar_reproduce.sh.
source "$(dirname "$0")/launch.sh"
launch 8 --cfg cfgs/larp_ar.yaml --tag reproduce --name nar_l_reproduce \
  --opts vae.checkpoint "${TOKENIZER:-hywang66/LARP-L-long-tokenizer}" "$@"
