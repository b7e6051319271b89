#!/bin/bash
# Our trainer and torchtitan 0.2.2 side by side on one GPU, in one call: absolute figures drift
# between machines by ~5%, their ratio within one call does not. Run from the repository root:
#   bash launch/bench_vs_torchtitan.sh TORCHTITAN_DIR TOKENIZER SHARD_DIR ROW [ROW ...]
# TORCHTITAN_DIR is a copy of ../shared/bench/torchtitan; ROW is SHAPE:BATCH:SEQ:AC[:FLOAT8] with
# SHAPE 1B or 8B_L8 (torchtitan's flavors), AC none or selective, FLOAT8 none (default), tensorwise or
# rowwise (both sides then need torchao; the output head stays bf16 on both), e.g. 1B:2:8192:none
# 8B_L8:1:8192:selective 8B_L8:1:8192:none:tensorwise.
# Logs go to $LOG_DIR (default /tmp). Prints each side's summary line, then per row:
#   RATIO shape=1B batch=2 seq=8192 ac=none float8=none tokens_per_s=1.05x peak_mem_gib=42.6/50.7
set -u
TT=$1 TOK=$2 SHARDS=$3; shift 3
LOGS=${LOG_DIR:-/tmp}
declare -A CONF=([1B]=bench_1b [8B_L8]=bench_8b_l8)
for row in "$@"; do
  IFS=: read -r shape batch seq ac float8 <<< "$row"
  float8=${float8:-none}
  tt_float8=()
  if [ "$float8" != none ]; then
    tt_float8=(--model.converters quantize.linear.float8 --quantize.linear.float8.recipe_name "$float8"
               --quantize.linear.float8.filter_fqns output)
  fi
  log=$LOGS/ours_${shape}_b${batch}_s${seq}_${ac}_${float8}.log
  timeout 480 torchrun --standalone --nproc_per_node=1 launch/bench.py "+conf=${CONF[$shape]}" \
    global_batch_size="$batch" micro_batch_size="$batch" data.seq_len="$seq" \
    parallel.activation_checkpointing="$ac" parallel.float8="$float8" data.tokenizer="$TOK" \
    "data.shards=[$SHARDS]" hydra.run.dir=/tmp/bench_runs/ours > "$log" 2>&1
  ours=$(grep -h "^BENCH" "$log" | tail -1)
  echo "${ours:-BENCH shape=$shape batch=$batch FAILED: $(grep -h "^error" "$log" | tail -1 | cut -c1-300)}"
  theirs=$(LOG_DIR=$LOGS bash "$TT"/tt_bench.sh "$shape" "$batch" "$seq" --compile.enable "$ac" "${tt_float8[@]}" |
           tail -1)
  echo "$theirs"
  python3 - "shape=$shape batch=$batch seq=$seq ac=$ac float8=$float8" "$ours" "$theirs" <<'PY'
import re, sys
label, ours, theirs = sys.argv[1:]
get = lambda line, key: (m := re.search(rf"\b{key}=([\d.]+)", line)) and float(m[1])
tps, tt_tps = get(ours, "tokens_per_s"), get(theirs, "tps")
ratio = f"{tps / tt_tps:.2f}x" if tps and tt_tps else "n/a"
print(f"RATIO {label} tokens_per_s={ratio} peak_mem_gib={get(ours, 'peak_mem_gib')}/{get(theirs, 'mem_gib')}")
PY
done
