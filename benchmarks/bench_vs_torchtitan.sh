#!/bin/bash
# Our trainer and torchtitan 0.2.2 side by side on one GPU, in one call: absolute figures drift
# between machines by ~5%, their ratio within one call does not. Run from the repository root:
#   bash benchmarks/bench_vs_torchtitan.sh TORCHTITAN_DIR TOKENIZER SHARD_DIR ROW [ROW ...]
# TORCHTITAN_DIR is a copy of ../shared/bench/torchtitan; ROW is SHAPE:BATCH:SEQ:AC[:FLOAT8] with
# SHAPE 1B or 8B_L8 (torchtitan's flavors), AC none or selective, FLOAT8 none (default), tensorwise or
# rowwise (both sides then need torchao; the output head stays bf16 on both), e.g. 1B:2:8192:none
# 8B_L8:1:8192:selective 8B_L8:1:8192:none:tensorwise.
# A BATCH range LO-HI (e.g. 1B:3-6:8192:none) finds each side's largest micro batch that runs,
# trying HI first and going down (0: none in the range ran).
# Logs go to $LOG_DIR (default /tmp). Prints each run's summary line, then per row:
#   RATIO shape=1B batch=2 seq=8192 ac=none float8=none tokens_per_s=1.05x peak_mem_gib=42.6/50.7
#   MAXBATCH shape=1B seq=8192 ac=none float8=none ours=6 torchtitan=3 ratio=2.00x
set -u
TT=$1 TOK=$2 SHARDS=$3; shift 3
# The checkout on the workers' path: a GPU machine may have it without the package installed.
export PYTHONPATH="$(cd "$(dirname "$0")/.." && pwd)${PYTHONPATH:+:$PYTHONPATH}"
LOGS=${LOG_DIR:-/tmp}
declare -A CONF=([1B]=bench_1b [8B_L8]=bench_8b_l8)

ours() {  # SHAPE BATCH SEQ AC FLOAT8 -> our BENCH line, or a FAILED line with the error
  local log=$LOGS/ours_$1_b$2_s$3_$4_$5.log
  timeout 480 torchrun --standalone --nproc_per_node=1 benchmarks/bench.py "+conf=${CONF[$1]}" \
    global_batch_size="$2" micro_batch_size="$2" data.seq_len="$3" \
    parallel.activation_checkpointing="$4" parallel.float8="$5" data.tokenizer="$TOK" \
    "data.shards=[$SHARDS]" hydra.run.dir=/tmp/bench_runs/ours > "$log" 2>&1
  local line
  line=$(grep -h "^BENCH" "$log" | tail -1)
  echo "${line:-BENCH shape=$1 batch=$2 FAILED: $(grep -h "^error" "$log" | tail -1 | cut -c1-300)}"
}

theirs() {  # SHAPE BATCH SEQ AC FLOAT8 -> torchtitan's TORCHTITAN line (FAILED when it did not run)
  local float8=()
  if [ "$5" != none ]; then
    float8=(--model.converters quantize.linear.float8 --quantize.linear.float8.recipe_name "$5"
            --quantize.linear.float8.filter_fqns output)
  fi
  LOG_DIR=$LOGS bash "$TT"/tt_bench.sh "$1" "$2" "$3" --compile.enable "$4" "${float8[@]}" | tail -1
}

largest() {  # SIDE SHAPE LO HI SEQ AC FLOAT8 -> the largest batch in LO..HI that runs (0: none)
  local side=$1 shape=$2 lo=$3 hi=$4 b line
  for ((b = hi; b >= lo; b--)); do
    line=$($side "$shape" "$b" "${@:5}")
    echo "$line" >&2
    if [[ $line != *FAILED* ]]; then echo "$b"; return; fi
  done
  echo 0
}

for row in "$@"; do
  IFS=: read -r shape batch seq ac float8 <<< "$row"
  float8=${float8:-none}
  label="shape=$shape seq=$seq ac=$ac float8=$float8"
  if [[ $batch == *-* ]]; then
    mine=$(largest ours "$shape" "${batch%-*}" "${batch#*-}" "$seq" "$ac" "$float8")
    tt=$(largest theirs "$shape" "${batch%-*}" "${batch#*-}" "$seq" "$ac" "$float8")
    ratio=$( ((tt > 0)) && python3 -c "print(f'{$mine / $tt:.2f}x')" || echo n/a)
    echo "MAXBATCH $label ours=$mine torchtitan=$tt ratio=$ratio"
    continue
  fi
  mine=$(ours "$shape" "$batch" "$seq" "$ac" "$float8")
  tt=$(theirs "$shape" "$batch" "$seq" "$ac" "$float8")
  echo "$mine"
  echo "$tt"
  python3 - "shape=$shape batch=$batch seq=$seq ac=$ac float8=$float8" "$mine" "$tt" <<'PY'
import re, sys
label, ours, theirs = sys.argv[1:]
get = lambda line, key: (m := re.search(rf"\b{key}=([\d.]+)", line)) and float(m[1])
tps, tt_tps = get(ours, "tokens_per_s"), get(theirs, "tps")
ratio = f"{tps / tt_tps:.2f}x" if tps and tt_tps else "n/a"
print(f"RATIO {label} tokens_per_s={ratio} peak_mem_gib={get(ours, 'peak_mem_gib')}/{get(theirs, 'mem_gib')}")
PY
done
