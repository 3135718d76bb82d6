#!/usr/bin/env bash
# Train the class-conditional NAR (next-neighbor) generator, llama-abs-L, on UCF-101 with a frozen LARP tokenizer
# (the config's settings). The name is the NAR release's; the raster LARP-AR generator is
# train_larp_ar_reproduce.sh. TOKENIZER: hub id, hub-mixin folder (e.g. save/larp_tokenizer/export) or training
# checkpoint; NPROC processes per node (default 8); extra arguments are more --opts pairs (e.g. train.max_steps 1000).
source "$(dirname "$0")/launch.sh"
launch "${NPROC:-8}" --cfg cfgs/larp_ar.yaml --manualSeed 66667 --tag default --name larp_ar \
  --opts vae.checkpoint "${TOKENIZER:-hywang66/LARP-L-long-tokenizer}" "$@"
