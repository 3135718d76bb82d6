#!/usr/bin/env bash
# The hywang66/LARP-L-long-tokenizer release recipe (the reference's scripts/train_larp_tokenizer_reproduce.sh):
# cfgs/larp_tokenizer.yaml holds every value of it (global batch 128, 150 epochs of K600 + UCF-101 train, ...), run
# on one 8-GPU node. Resumes automatically; extra arguments go to train.py. tests/test_recipes.py checks the
# resolved config against the reference's values (tests/fixtures/reference/recipes.json).
source "$(dirname "$0")/launch.sh"
launch 8 --cfg cfgs/larp_tokenizer.yaml --tag reproduce --name larp_tokenizer_reproduce "$@"
