#!/usr/bin/env bash
# Set up, then run the demo: a real pretraining of the debug Llama on 2 CPU processes (gloo).
# The tokenizer and shards are built from a public-domain sample corpus on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
torchrun --standalone --nproc_per_node=2 launch/pretrain.py +conf=debug "$@"
# The run's curves (train/observe/report.py), drawn at its end into the run folder: outputs/<run_name>/report.png.
out=outputs name=debug dir=""
for arg in "$@"; do
  case "$arg" in
    output_dir=*) out="${arg#*=}" ;;
    run_name=*) name="${arg#*=}" ;;
    hydra.run.dir=*) dir="${arg#*=}" ;;
  esac
done
report="${dir:-$out/$name}/report.png"
if [ -f "$report" ]; then
  echo "report: $report (llm-report RUN_DIR [RUN_DIR ...] draws any runs, overlaid)"
fi
