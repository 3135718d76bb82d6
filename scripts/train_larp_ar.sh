#!/usr/bin/env bash
# Train the class-conditional NAR generator (llama-abs-L) on UCF-101 with a frozen LARP tokenizer (the config's
# settings). TOKENIZER: hub id, hub-mixin folder (e.g. save/larp_tokenizer/export) or training checkpoint; NPROC
# processes per node (default 4); extra arguments are more --opts pairs (e.g. train.max_steps 1000).
source "$(dirname "$0")/launch.sh"
launch "${NPROC:-4}" --cfg cfgs/larp_ar.yaml --manualSeed 66667 --tag default --name larp_ar \
  --opts vae.checkpoint "${TOKENIZER:-hywang66/LARP-L-long-tokenizer}" "$@"
