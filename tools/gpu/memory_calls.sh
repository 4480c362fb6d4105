#!/usr/bin/env bash
# Issue 22 on the GPU: the memory fits (24 GB with the text encoder, 16 GB with --low-vram), the prompt-change
# latency, the estimates table, and the live path. From the repo root, with `.whl` carried (it must hold the
# aiortc / PyAV wheels and their dependencies for part L: see docs/benchmarks.md):
#   source tools/gpu/env.sh && bash tools/gpu/memory_calls.sh M    # memory fits, one bench process each (~8 min)
#   source tools/gpu/env.sh && bash tools/gpu/memory_calls.sh E    # the estimates table (~8 min)
#   source tools/gpu/env.sh && bash tools/gpu/memory_calls.sh L1   # live path at 1 and 2 steps, with bench (~9 min)
#   source tools/gpu/env.sh && bash tools/gpu/memory_calls.sh L2   # live path at 3 and 4 steps, with bench (~9 min)
#   source tools/gpu/env.sh && bash tools/gpu/memory_calls.sh LN   # live, batching none, 1-4 steps, 30 FPS camera
#   source tools/gpu/env.sh && bash tools/gpu/memory_calls.sh LS   # live, stream batch, 1-4 steps, 60 FPS source
# Each run writes its JSON and log under $OUT; every bench caps its memory before allocating anything, so a run
# that completes proves the fit on a card of that size.
set -o pipefail
export COLUMNS=200
PART=${1:?usage: memory_calls.sh M|E|F|L|L1|L2|LN|LS|LSN|LF}
: "${OUT:?set OUT}"
# The device returns at most 8 files: runs write under a work folder, summarised into $OUT at the end.
FINAL=$OUT; OUT=/tmp/memory-$PART; rm -rf "$OUT"; mkdir -p "$OUT"
B="python3 -m wanstream.cli.main bench --chunks 20 --warm-chunks 6"
run() {  # run NAME TIMEOUT CMD...
  local name=$1 limit=$2; shift 2
  echo "[$(date +%T)] $name"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  echo "$rc" > "$OUT/$name.rc"
  grep -E "FPS|memory GiB|prompt change|memory limit|Error|error:|Traceback" "$OUT/$name.log" | tail -6
  echo "  rc=$rc"
}
case $PART in
M)
  # The default (text encoder parked on the host) and fp8 on the GPU, under 24 GiB; bf16 on the GPU unlimited
  # (the reference point); the low-memory profile under 16 GiB.
  run fit24_host 150 $B --configs "batch,480x832,2,wan" --with-text-encoder --text-encoder host \
      --memory-limit-gib 24 --json "$OUT/fit24_host.json"
  run fit24_fp8 150 $B --configs "batch,480x832,2,wan" --with-text-encoder --text-encoder fp8 \
      --memory-limit-gib 24 --json "$OUT/fit24_fp8.json"
  run te_gpu 150 $B --configs "batch,480x832,2,wan" --with-text-encoder --text-encoder gpu \
      --json "$OUT/te_gpu.json"
  run fit16_low 150 $B --configs "batch,480x832,2,taehv" --with-text-encoder --low-vram \
      --memory-limit-gib 16 --json "$OUT/fit16_low.json"
  ;;
E)
  # The rows generate and serve estimate from: defaults (host, bf16) and the low-memory profile.
  run est_default 330 $B --configs "batch,480x832,1,wan;batch,480x832,2,wan;batch,480x832,4,wan;batch,480x832,2,taehv;batch,512x512,2,wan" \
      --with-text-encoder --write-estimates "$OUT/estimates.json" --json "$OUT/est_default.json"
  run est_low 240 $B --configs "batch,480x832,1,taehv;batch,480x832,2,taehv;batch,480x832,4,taehv" \
      --with-text-encoder --low-vram --write-estimates "$OUT/estimates.json" --json "$OUT/est_low.json"
  ;;
F)
  # One call of <= 10 minutes: the fits of M with their rows written to the estimates table (the default and the
  # low-memory profile), then the prompt extender's timing.
  run fit24_host 130 $B --configs "batch,480x832,2,wan" --with-text-encoder --text-encoder host \
      --memory-limit-gib 24 --write-estimates "$OUT/estimates.json" --json "$OUT/fit24_host.json"
  run fit24_fp8 100 $B --configs "batch,480x832,2,wan" --with-text-encoder --text-encoder fp8 \
      --memory-limit-gib 24 --json "$OUT/fit24_fp8.json"
  [ -n "$WITH_TE_GPU" ] && run te_gpu 90 $B --configs "batch,480x832,2,wan" --with-text-encoder --text-encoder gpu \
      --json "$OUT/te_gpu.json"
  run fit16_low 110 $B --configs "batch,480x832,2,taehv" --with-text-encoder --low-vram \
      --memory-limit-gib 16 --write-estimates "$OUT/estimates.json" --json "$OUT/fit16_low.json"
  run extender 100 python3 tools/gpu/extender_timing.py "$OUT/extender.json"
  ;;
L)
  # The short form: 2 steps only (one device call with what is left of a session's time).
  run live_L 330 python3 tools/gpu/live_path.py --steps 2 --warm-s 40 --measure-s 15 \
      --bench-arg=--chunks=15 --bench-arg=--warm-chunks=4 --out "$OUT/live_L.json"
  ;;
L1|L2)
  steps=$([ "$PART" = L1 ] && echo 1,2 || echo 3,4)
  run "live_$PART" 560 python3 tools/gpu/live_path.py --steps "$steps" --warm-s 30 --measure-s 20 \
      --bench-arg=--chunks=20 --bench-arg=--warm-chunks=6 --out "$OUT/live_$PART.json"
  ;;
LN)
  # Latency without the lanes' lag: a 30 FPS camera, every step count in one server (~7 min).
  run live_LN 520 python3 tools/gpu/live_path.py --steps 1,2,3,4 --batching none --fps 30 --warm-s 15 \
      --warm-first-s 45 --measure-s 12 --bench-arg=--chunks=15 --bench-arg=--warm-chunks=5 --out "$OUT/live_LN.json"
  ;;
LS)
  # Throughput: a source faster than the pipeline (60 FPS), stream batch, so delivered FPS meets bench's (~7 min).
  run live_LS 330 python3 tools/gpu/live_path.py --steps 1,2,3,4 --batching stream --fps 60 --warm-s 12 \
      --warm-first-s 45 --measure-s 10 --bench-arg=--chunks=15 --bench-arg=--warm-chunks=5 --out "$OUT/live_LS.json"
  ;;
LSN)
  # LS, then no batch at 3 and 4 steps (warm cache by then) in what is left of one call.
  run live_LS 330 python3 tools/gpu/live_path.py --steps 1,2,3,4 --batching stream --fps 60 --warm-s 12 \
      --warm-first-s 45 --measure-s 10 --bench-arg=--chunks=15 --bench-arg=--warm-chunks=5 --out "$OUT/live_LS.json"
  run live_LN34 200 python3 tools/gpu/live_path.py --steps 3,4 --batching none --fps 30 --warm-s 12 \
      --measure-s 10 --no-bench --out "$OUT/live_LN34.json"
  ;;
LF)
  # The live path after the converter thread and the input-anchored pacing: no batch at 1-4 steps (as LN),
  # then stream batch at 2 and 4 steps, both with a 30 FPS camera (~8 min).
  run live_LF_none 300 python3 tools/gpu/live_path.py --steps 1,2,3,4 --batching none --fps 30 --warm-s 12 \
      --warm-first-s 45 --measure-s 10 --bench-arg=--chunks=15 --bench-arg=--warm-chunks=5 --out "$OUT/live_LF_none.json"
  run live_LF_stream 200 python3 tools/gpu/live_path.py --steps 2,4 --batching stream --fps 30 --warm-s 12 \
      --measure-s 10 --bench-arg=--chunks=15 --bench-arg=--warm-chunks=5 --out "$OUT/live_LF_stream.json"
  ;;
*) echo "unknown part $PART"; exit 2 ;;
esac
python3 tools/gpu/summarize.py "$OUT" "$FINAL" "$PART"
