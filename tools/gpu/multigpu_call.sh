#!/usr/bin/env bash
# Multi-GPU (issue 11) on a 2- or 4-GPU kind (nvidia-h200-x2 / -x4), from the repo root after
# `source tools/gpu/env.sh`; logs and JSON under $OUT. Each step is bounded to fit one device call:
#   1. the ring against one GPU on the same random full-size weights (bf16 agreement, eager, 480x832);
#   2-3. FPS and scaling efficiency vs one GPU at 480x832 and at 512x512, 1-4 steps (Wan VAE both ways);
#   4. the block rebalancer at 512x512 (TAEHV, the paper's setting for its multi-GPU numbers).
# Run steps separately (STEPS="1 2") when a call's time is short; GPUS overrides the GPU count.
set -o pipefail
export COLUMNS=200  # rich wraps long lines at 80 columns without a terminal
N=${GPUS:-$(nvidia-smi -L | wc -l)}
STEPS=${STEPS:-"1 2 3 4"}
B="python3 -m wanstream.cli.main bench --gpus $N --chunks 20 --warm-chunks 8"
stamp() { echo "[$(date +%T)] $*"; }
for step in $STEPS; do
  case $step in
  1) stamp "check: ring of $N vs one GPU"
     timeout 300 python3 -m wanstream.bench.ring_check --gpus "$N" --json "$OUT/check-$N.json" > "$OUT/check-$N.log" 2>&1
     grep -E '"(identical|rel_l2|max_uint8_diff|seconds|one_process|ring)"' "$OUT/check-$N.log" ;;
  2) stamp "bench 480x832, 1-4 steps"
     timeout 570 $B --configs "batch,480x832,1,wan;batch,480x832,2,wan;batch,480x832,3,wan;batch,480x832,4,wan" \
       --json "$OUT/bench-$N-480x832.json" > "$OUT/bench-$N-480x832.log" 2>&1
     grep -E "GPUs? .*FPS" "$OUT/bench-$N-480x832.log" ;;
  3) stamp "bench 512x512, 1-4 steps"
     timeout 570 $B --configs "batch,512x512,1,wan;batch,512x512,2,wan;batch,512x512,3,wan;batch,512x512,4,wan" \
       --json "$OUT/bench-$N-512x512.json" > "$OUT/bench-$N-512x512.log" 2>&1
     grep -E "GPUs? .*FPS" "$OUT/bench-$N-512x512.log" ;;
  4) stamp "rebalancer, 512x512 TAEHV 1 and 2 steps"
     timeout 570 $B --rebalance --configs "batch,512x512,1,taehv;batch,512x512,2,taehv" \
       --json "$OUT/bench-$N-rebalance.json" > "$OUT/bench-$N-rebalance.log" 2>&1
     grep -E "GPUs? .*FPS|rebalanced" "$OUT/bench-$N-rebalance.log" ;;
  esac
done
stamp done
