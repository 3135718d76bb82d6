#!/usr/bin/env bash
# The tokenizer run on 8-GPU nodes (global batch 64 = 8 per GPU on one node). Resumes automatically.
source "$(dirname "$0")/launch.sh"
launch 8 --cfg cfgs/larp_tokenizer.yaml --manualSeed 66667 --tag reproduce --name larp_tokenizer_reproduce "$@"
