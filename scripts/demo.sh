#!/usr/bin/env bash
# Set up, then run the demo: a real pretraining of the debug Llama on 2 CPU processes (gloo).
# The tokenizer and shards are built from a public-domain sample corpus on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
torchrun --standalone --nproc_per_node=2 launch/pretrain.py +conf=debug "$@"
