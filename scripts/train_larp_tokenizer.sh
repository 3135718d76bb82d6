#!/usr/bin/env bash
# Train the LARP-L-long tokenizer on K600 + UCF-101 (16 x 128 x 128 clips -> 1024 tokens; everything else as in
# the config). NPROC processes per node (default 8, one 8-GPU node as the recipes); -b in the config is the global
# batch. Resumes from save/larp_tokenizer/ckpt_latest.pth. Extra arguments go to train.py (e.g. --replace,
# --opts train.max_steps 1000).
source "$(dirname "$0")/launch.sh"
launch "${NPROC:-8}" --cfg cfgs/larp_tokenizer.yaml --manualSeed 66667 --tag default --name larp_tokenizer "$@"
