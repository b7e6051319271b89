#!/usr/bin/env bash
# Set up, then run the demo: a real pretraining of the debug Llama on 2 CPU processes (gloo). Each stage says
# what it does and how long it took: [1/4] the install (skipped when this Python has it already), [2/4] the
# tokenizer and [3/4] the shards of the public-domain sample corpus (built once, into data/demo/), [4/4] the
# training, which ends by drawing the run's curves into its folder.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
begin=$SECONDS

# Where the run and the demo data go, as the command line's overrides say (the keys the trainer reads).
out=outputs name=debug dir="" demo_dir="" vocab="" resume=auto
for arg in "$@"; do
  case "$arg" in
    checkpoint.resume=*) resume="${arg#*=}" ;;
    output_dir=*) out="${arg#*=}" ;;
    run_name=*) name="${arg#*=}" ;;
    hydra.run.dir=*) dir="${arg#*=}" ;;
    data.demo_dir=*) demo_dir="${arg#*=}" ;;
    data.demo_vocab_size=*) vocab="${arg#*=}" ;;
  esac
done
run_dir="${dir:-$out/$name}"

installed() {
  # Prints torch's version when this checkout is installed (editable) in this Python with every requirement of
  # pyproject.toml met; fails otherwise. -P: not this folder's own egg-info or packages, what is installed.
  python3 -P - "$PWD" <<'EOF' 2>/dev/null
import importlib.metadata as md, json, pathlib, sys, tomllib
from packaging.requirements import Requirement
url = json.loads(md.distribution("llm-pretrain").read_text("direct_url.json") or "{}").get("url", "")
assert pathlib.Path(url.removeprefix("file://")).resolve() == pathlib.Path(sys.argv[1]).resolve()
project = tomllib.loads((pathlib.Path(sys.argv[1]) / "pyproject.toml").read_text())["project"]
for spec in project["dependencies"] + project["optional-dependencies"]["dev"]:
    req = Requirement(spec)
    assert req.specifier.contains(md.version(req.name), prereleases=True), spec
print(md.version("torch"))
EOF
}

install() {
  # scripts/install.sh (pip, quiet) with a line every 30 s, its output in a log shown only when it fails.
  mkdir -p "$out"
  local log="$out/install.log" start=$SECONDS
  echo "demo: [1/4] installing the CPU build of torch 2.13 and this package (pip install -e '.[dev]') into" \
       "$(python3 -c 'import sys; print(sys.prefix)'): about 4 min the first time; pip's output goes to $log"
  bash scripts/install.sh >"$log" 2>&1 &
  local pid=$! waited=0
  while kill -0 "$pid" 2>/dev/null; do
    sleep 1
    if (( ++waited % 30 == 0 )); then echo "demo: [1/4] still installing ($(( SECONDS - start )) s)"; fi
  done
  if ! wait "$pid"; then
    tail -n 5 "$log" >&2
    if grep -q externally-managed-environment "$log"; then
      echo "demo: this Python refuses pip install (PEP 668): make a virtual environment first," \
           "python3 -m venv .venv && . .venv/bin/activate, then run bash scripts/demo.sh again" >&2
    fi
    echo "demo: [1/4] the install failed after $(( SECONDS - start )) s (pip's output: $log)" >&2
    exit 1
  fi
  echo "demo: [1/4] installed in $(( SECONDS - start )) s"
}

if torch_version=$(installed); then
  echo "demo: [1/4] installed already (torch $torch_version, this checkout, every requirement of pyproject.toml):" \
       "no pip (bash scripts/install.sh installs again)"
else
  install
fi

# [2/4] and [3/4]: the tokenizer and shards the trainer would otherwise build silently at start-up (it then finds
# them: ensure_demo_data trains no tokenizer that is there, and a finished build of the same inputs is kept).
python3 - "$demo_dir" "$vocab" <<'EOF'
import sys
import time
from pathlib import Path

from data_pipeline.prepare import ensure_demo_data
from data_pipeline.sample_corpus import sample_corpus_dir
from data_pipeline.tokenizer import train_tokenizer
from train.config import DataSection

out, vocab = Path(sys.argv[1] or DataSection.demo_dir), int(sys.argv[2] or DataSection.demo_vocab_size)
model_path, start = out / f"tokenizer_{vocab}.model", time.perf_counter()
if model_path.is_file():
    print(f"demo: [2/4] tokenizer {model_path}: trained before", flush=True)
else:
    print(f"demo: [2/4] training the tokenizer ({vocab} pieces) on the sample corpus (Shakespeare) ...", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    train_tokenizer([str(sample_corpus_dir())], model_path, vocab, txt_mode="file")  # as ensure_demo_data does
    print(f"demo: [2/4] tokenizer {model_path} trained in {time.perf_counter() - start:.0f} s", flush=True)
shards, start = out / f"shards_{vocab}", time.perf_counter()
built = (shards / "manifest.json").is_file()
print(f"demo: [3/4] {'checking the shards' if built else 'building the shards'} in {shards} ...", flush=True)
ensure_demo_data(out, vocab_size=vocab)
print(f"demo: [3/4] shards {'checked' if built else 'built'} in {time.perf_counter() - start:.0f} s", flush=True)
EOF

# [4/4]: a run folder that holds checkpoints is continued (at its end, there is nothing left to train).
continued=""
if [ "$resume" = auto ] && compgen -G "$run_dir/checkpoints/step_*" >/dev/null; then continued=yes; fi
echo "demo: [4/4] training conf/debug.yaml's small Llama on 2 CPU processes (torchrun, gloo): about 1 min on 2" \
     "idle cores, more when they are busy; the run's folder: $run_dir"
start=$SECONDS
torchrun --standalone --nproc_per_node=2 launch/pretrain.py +conf=debug "$@"
echo "demo: [4/4] the run took $(( SECONDS - start )) s; the whole demo $(( SECONDS - begin )) s"
# The run's curves (train/observe/report.py), drawn at its end into the run folder: outputs/<run_name>/report.png.
report="$run_dir/report.png"
if [ -f "$report" ]; then
  echo "report: $report (llm-report RUN_DIR [RUN_DIR ...] draws any runs, overlaid)"
fi
if [ -n "$continued" ]; then
  echo "demo: this run continued the checkpoints in $run_dir; to train a new one: bash scripts/demo.sh" \
       "run_name=NEW, or add checkpoint.resume=none checkpoint.overwrite=true to start $run_dir over"
fi
