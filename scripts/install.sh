#!/usr/bin/env bash
# Installs the project into the active Python: the CPU build of torch first (a bare `torch`
# requirement would pull a multi-GB CUDA build), then the package with its test and lint extras (pytest, ruff).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e '.[dev]'
