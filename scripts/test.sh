#!/usr/bin/env bash
# Set up, lint, then run the whole CPU test suite; a lint error fails the run before any test starts.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
python3 -m ruff check .  # the rules are in pyproject.toml [tool.ruff]
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline
# Two pytest processes, each taking whole files (their module fixtures, SLURM jobs included, run once): most
# tests are one process waiting on another, so two share two cores well. The 15 slowest are printed: the suite
# must stay under 30 minutes.
python3 -m pytest tests -q -n 2 --dist loadfile --durations=15 "$@"
