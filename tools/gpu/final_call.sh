#!/usr/bin/env bash
# One device call, most important first (each step bounded; logs and JSON under $OUT):
# GPU conformance + VACE on/off (final_checks.sh), cold and warm start, LoRA none/merged/runtime, the reference.
# Run from the repo root after `source tools/gpu/env.sh`, with `.whl` and `ref-carry` carried.
set -o pipefail
B="python3 -m wanstream.cli.main bench"
stamp() { echo "[$(date +%T)] $*"; }
stamp "conformance + VACE"; bash tools/gpu/final_checks.sh
stamp "cold start (empty inductor cache)"; rm -rf "$TORCHINDUCTOR_CACHE_DIR"
timeout 150 $B --configs "batch,480x832,2,wan" --chunks 30 --warm-chunks 8 --json "$OUT/cold.json" > "$OUT/cold.log" 2>&1
grep -E "^\[|FPS" "$OUT/cold.log" | tail -12
stamp "warm start (same cache, new process)"
timeout 90 $B --configs "batch,480x832,2,wan" --chunks 30 --warm-chunks 8 --json "$OUT/warm.json" > "$OUT/warm.log" 2>&1
grep -E "^\[|FPS" "$OUT/warm.log" | tail -12
stamp "LoRA rank 32: none / merged / runtime"
timeout 150 $B --configs "batch,480x832,2,fast" --chunks 30 --warm-chunks 8 --lora-rank 32 --json "$OUT/lora.json" > "$OUT/lora.log" 2>&1
grep -E "FPS|rescale" "$OUT/lora.log" | tail -8
stamp "reference (same call)"
timeout 150 bash ref-carry/run_reference.sh final --configs "batch,480x832,2,wan;batch,480x832,2,fast" \
  --chunks 30 --warm-chunks 3 --steady-from 10 > "$OUT/ref.log" 2>&1; tail -6 "$OUT/ref.log"
stamp done
