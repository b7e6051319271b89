#!/usr/bin/env bash
# Set up, lint, then run the whole CPU test suite; a lint error fails the run before any test starts.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
python3 -m ruff check .  # the rules are in pyproject.toml [tool.ruff]
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline
python3 -m pytest tests -q --durations=15 "$@"  # the 15 slowest: the suite must stay under 30 minutes
