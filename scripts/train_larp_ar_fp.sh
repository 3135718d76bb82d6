#!/usr/bin/env bash
# Train the frame-prediction NAR generator on Kinetics-600 (5 conditioning frames) with a frozen LARP tokenizer.
# TOKENIZER and NPROC as in train_larp_ar.sh; extra arguments are more --opts pairs.
source "$(dirname "$0")/launch.sh"
launch "${NPROC:-8}" --cfg cfgs/larp_ar_fp.yaml --manualSeed 66667 --tag default --name larp_ar_fp \
  --opts vae.checkpoint "${TOKENIZER:-hywang66/LARP-L-long-tokenizer}" "$@"
