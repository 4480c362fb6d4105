#!/usr/bin/env bash
# The GPU acceptance matrix of the optimised path (compile + CUDA graphs), in two device calls of <= 10 minutes,
# back to back on the same machine (part B needs the compile cache part A left). From the repo root, with `.whl`
# and `ref-carry` carried:
#   (carry .whl-av too, the PyAV wheel, and first: pip install --target /tmp/site .whl-av/*.whl;
#   bash tools/gpu/wheels.sh makes both folders here)
#   source tools/gpu/env.sh && bash tools/gpu/matrix.sh A     # empty compile cache: every config in ONE process,
#                                                             # then the reference at 480x832, 1-4 steps
#   source tools/gpu/env.sh && bash tools/gpu/matrix.sh B     # warm cache, each run in a NEW process: 1 and 4
#                                                             # steps x codecs x batch/no batch, LoRA none/merged/
#                                                             # runtime, VACE on/off, live changes, a real OOM
# Each part leaves two files in $OUT: summary_<part>.json (every JSON the runs wrote, plus exit codes and crash
# lines) and log_<part>.txt (all logs). Exit codes: a crash shows as a non-zero "rc" beside its run.
set -o pipefail
export COLUMNS=200
PART=${1:?usage: matrix.sh A|B|M|C|D|E|V|S|R|R2|R3|R4|R5|R6|R7|R8|T|T2|T3|T4|T6|T7|P|W|F8|FA1|FA2}
W=/tmp/matrix-$PART; rm -rf "$W"; mkdir -p "$W"
B="python3 -m wanstream.cli.main bench"
stamp() { echo "[$(date +%T)] $*" | tee -a "$W/steps.txt"; }
# `wanstream`'s command line imports PyAV for every command: without it every run stops at import (call 38
# lost a call so). FA1 (keeps files) and FA2 (the attention probe) import no wanstream.
if [ "$PART" != FA1 ] && [ "$PART" != FA2 ] && ! python3 -c "import av" 2>/dev/null; then
  stamp "PyAV is not importable: carry .whl-av and start the command with"
  stamp "  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl-av/*.whl"
  exit 2
fi
# The two result files, rewritten after every run: a call cut short still brings back what ran.
summarize() { python3 tools/gpu/summarize.py "$W" "$OUT" "$PART"; }
run() {  # run NAME TIMEOUT CMD...: log to $W/NAME.log, exit code to $W/NAME.rc
  local name=$1 limit=$2; shift 2
  stamp "$name"
  local t0=$(date +%s)
  timeout "$limit" "$@" > "$W/$name.log" 2>&1; local rc=$?
  echo "$rc $(( $(date +%s) - t0 ))" > "$W/$name.rc"
  grep -E "FPS|fallbacks|live changes|Error|error:|Traceback|ok\"" "$W/$name.log" | grep -v "^ " | tail -8
  echo "  rc=$rc"
  [ -n "${OUT:-}" ] && summarize
}
# Runs several parts share (each named as its JSON is).
cold_live_changes() {  # cold_live_changes LIMIT: 2 and 1 step in one process, then the live changes
  run cold "$1" $B --configs "batch,480x832,2,wan;batch,480x832,1,wan" \
    --chunks 12 --warm-chunks 4 --live-changes --json "$W/cold.json"
}
warm_start() {  # warm_start LIMIT CHUNKS WARM_CHUNKS: the default config's start in a new process
  run warm_start_2step "$1" $B --configs "batch,480x832,2,wan" --chunks "$2" --warm-chunks "$3" \
    --json "$W/warm_start_2step.json"
}
take() {  # take NAME LIMIT live|replay DIR [FLAGS...]: a take recorded and replayed here, or replayed anew
  local name=$1 limit=$2 mode=$3 dir=$4; shift 4
  run "$name" "$limit" python3 tools/gpu/replay_check.py "$mode" "$W/$dir" "$@" --json "$W/$name.json"
}
case $PART in
A)
  rm -rf "$TORCHINDUCTOR_CACHE_DIR"
  # Every config, one process, from an empty cache; grouped so each shape compiles once.
  run all_cold 420 $B --configs all --chunks 10 --warm-chunks 2 --json "$W/all_cold.json"
  run reference 170 bash ref-carry/run_reference.sh matrix \
    --configs "batch,480x832,1,wan;batch,480x832,2,wan;batch,480x832,3,wan;batch,480x832,4,wan" \
    --chunks 30 --warm-chunks 3 --steady-from 10
  cp "$OUT"/results_matrix.json "$W/reference.json" 2>/dev/null; rm -f "$OUT"/*_matrix.*
  ;;
B)
  # The crash this matrix exists for: the default config's second start, warm cache (its cold start ran in A).
  warm_start 120 30 8
  for steps in 1 4; do
    for codec in wan fast taehv; do
      for mode in batch nobatch; do
        extra=(); [ "$steps$codec$mode" = "1wanbatch" ] && extra=(--live-changes)
        # 8 warm chunks (bench's default): with 3, the chunks while the KV cache fills (new attention shapes
        # each, so new graphs) can fall in the 12-chunk window (call 32: a 208 ms chunk in the 1-step window,
        # 42.6 FPS against 48.1 from its chunk p50).
        run "warm_${mode}_${steps}_${codec}" 90 $B --configs "$mode,480x832,$steps,$codec" --chunks 12 \
          --warm-chunks 8 "${extra[@]}" --json "$W/warm_${mode}_${steps}_${codec}.json"
      done
    done
  done
  run lora 150 $B --configs "batch,480x832,2,wan" --chunks 20 --warm-chunks 4 --lora-rank 32 --json "$W/lora.json"
  run oom 120 python3 tools/gpu/oom_check.py "$W/oom.json"
  run vace 150 $B --configs "nobatch,480x832,2,text;nobatch,480x832,2,vace" --chunks 10 --warm-chunks 3 \
    --json "$W/vace.json"
  # Confirms the cause: the same warm start with the capture gate switched off (in this process only). Expect
  # the capture to be invalidated again — now caught: a fallback counted instead of a crash.
  run confirm_without_gate 90 python3 -c "
import contextlib, sys
from wanstream.models import fastpath
fastpath.CaptureGate.capture = lambda self, max_wait=0.5: contextlib.nullcontext(True)
from wanstream.cli.main import main
sys.exit(main(['bench', '--configs', 'batch,480x832,2,wan', '--chunks', '10', '--warm-chunks', '3', '--json', '$W/confirm_without_gate.json']))
"
  ;;
M)
  # The matrix in one call of < 10 minutes, for a session with less device time left: every config in one
  # process from an empty cache (as part A, without the reference; 8 chunks each: call 36's slow host ran 44 of
  # 48 in 330 s at 10), then each in a new process with the warm cache: 1 step with the live changes, VACE on /
  # off (call 36 ran out of time before it), 4 steps, a real OOM, LoRA none / merged / runtime (last: what time
  # is left).
  rm -rf "$TORCHINDUCTOR_CACHE_DIR"
  run all_cold 300 $B --configs all --chunks 8 --warm-chunks 2 --json "$W/all_cold.json"
  run warm_batch_1_wan 90 $B --configs "batch,480x832,1,wan" --chunks 12 --warm-chunks 8 --live-changes \
    --json "$W/warm_batch_1_wan.json"
  run vace 100 $B --configs "nobatch,480x832,2,text;nobatch,480x832,2,vace" --chunks 10 --warm-chunks 3 \
    --json "$W/vace.json"
  run warm_batch_4_wan 60 $B --configs "batch,480x832,4,wan" --chunks 12 --warm-chunks 8 \
    --json "$W/warm_batch_4_wan.json"
  run oom 60 python3 tools/gpu/oom_check.py "$W/oom.json"
  run lora 100 $B --configs "batch,480x832,2,wan" --chunks 20 --warm-chunks 4 --lora-rank 32 --json "$W/lora.json"
  ;;
C)
  # Re-check after the fixes from A/B: a frame-size change mid-process from an empty cache (the VAE compiling on
  # its thread while the DiT compiles and captures), a 4-step stream's clean exit, a real OOM.
  rm -rf "$TORCHINDUCTOR_CACHE_DIR"
  run size_change_cold 180 $B --configs "batch,480x832,2,wan;nobatch,512x512,2,wan" \
    --chunks 8 --warm-chunks 3 --json "$W/size_change_cold.json"
  run warm_batch_4_wan 80 $B --configs "batch,480x832,4,wan" --chunks 20 --json "$W/warm_batch_4_wan.json"
  run oom 90 python3 tools/gpu/oom_check.py "$W/oom.json"
  ;;
D)
  # After the first-call VAE change (a session's second part compiled) and the KV-snapshot change: a frame-size
  # change from an empty cache; warm starts at 1 / 2 / 4 steps (TTFF); a LoRA scale change (merged: pinned
  # backups); the prompt extender's timing; where the Wan VAE's time goes. Limits sum to < 600 s.
  rm -rf "$TORCHINDUCTOR_CACHE_DIR"
  run size_change_cold 150 $B --configs "batch,480x832,2,wan;nobatch,512x512,2,wan" \
    --chunks 8 --warm-chunks 3 --json "$W/size_change_cold.json"
  run warm_ttff 150 $B --configs "batch,480x832,1,wan;batch,480x832,2,wan;batch,480x832,4,wan" \
    --chunks 20 --json "$W/warm_ttff.json"
  run lora 100 $B --configs "batch,480x832,2,wan" --chunks 20 --warm-chunks 4 --lora-rank 32 --json "$W/lora.json"
  run extender 70 python3 tools/gpu/extender_timing.py "$W/extender.json"
  run vae_profile 90 python3 tools/gpu/vae_profile.py "$W/vae_profile.json"
  ;;
E)
  # Conv engine experiments on the VAE's slow layers; the extender; the LoRA scale change after the factor
  # caching; GPU conformance, float32 and bfloat16 against the per-family bounds (VACE included; needs `av`).
  run vae_experiments 110 python3 tools/gpu/vae_profile.py "$W/vae_experiments.json" --experiments-only
  run extender 70 python3 tools/gpu/extender_timing.py "$W/extender.json"
  run lora 120 $B --configs "batch,480x832,2,wan" --chunks 20 --warm-chunks 4 --lora-rank 32 --json "$W/lora.json"
  for dtype in float32 bfloat16; do
    for golden in golden golden-vace; do
      limit=80; [ $golden = golden-vace ] && limit=45
      run "conformance_${golden}_$dtype" $limit python3 -m wanstream.conformance "tests/$golden" --device cuda --dtype $dtype
    done
  done
  ;;
V)
  # VACE on the captured-graph path (issue 21 item 4): from an empty cache in one process (the default v2v config
  # first, so a regression there shows), then warm in a new process at 1 and 4 steps and at 512x512, then the same
  # VACE config with CUDA graphs off (the un-graphed comparison). Limits sum to < 560 s.
  rm -rf "$TORCHINDUCTOR_CACHE_DIR"
  run vace_cold 230 $B --configs "batch,480x832,2,wan;nobatch,480x832,2,text;nobatch,480x832,2,vace" \
    --chunks 20 --warm-chunks 8 --json "$W/vace_cold.json"
  run vace_warm 170 $B --configs "nobatch,480x832,2,text;nobatch,480x832,2,vace;nobatch,480x832,1,vace;nobatch,480x832,4,vace;nobatch,512x512,2,vace" \
    --chunks 20 --warm-chunks 8 --json "$W/vace_warm.json"
  run vace_no_graphs 120 $B --configs "nobatch,480x832,2,vace" --no-cuda-graphs --chunks 20 --warm-chunks 8 \
    --json "$W/vace_no_graphs.json"
  ;;
S)
  # One short call when device time is scarce, after a refactor of the session (one StreamSession + denoiser
  # backends, LoRA taking loaded weights): the three crash cases of issue 16 and VACE. From an empty cache in
  # one process: 2 steps, 1 step with live changes; then the 2-step warm start in a NEW process (the warm-cache
  # crash); then LoRA none / merged / runtime; then VACE, most important first. Limits sum to < 560 s.
  rm -rf "$TORCHINDUCTOR_CACHE_DIR"
  cold_live_changes 200
  warm_start 80 30 8
  run lora 120 $B --configs "batch,480x832,2,wan" --chunks 16 --warm-chunks 4 --lora-rank 32 --json "$W/lora.json"
  run vace 150 $B --configs "nobatch,480x832,2,vace" --chunks 12 --warm-chunks 4 --json "$W/vace.json"
  ;;
R)
  # Issue 16's live steps change with new shapes compiled in the background (cold, one process; the console's
  # "live changes" line and live_changes.phases in the JSON), the warm start in a new process; then issue 24's
  # take on the optimised path: recorded live and replayed in the same process, then in a NEW process (warm
  # cache); then the same as `serve --reproducible-takes` runs (no timed choices). Needs .whl-av.
  rm -rf "$TORCHINDUCTOR_CACHE_DIR"
  cold_live_changes 200
  warm_start 80 30 8
  take replay_live 150 live take
  take replay_new_process 100 replay take
  take replay_live_reproducible 120 live take_r --reproducible
  take replay_new_process_reproducible 90 replay take_r --reproducible
  ;;
R2)
  # Part R when device time is short: the live steps change (cold), then the take replayed in the same process
  # and in a new one (timed cuDNN algorithms). Limits sum to 350 s.
  rm -rf "$TORCHINDUCTOR_CACHE_DIR"
  cold_live_changes 150
  take replay_live 130 live take
  take replay_new_process 70 replay take
  ;;
R3)
  # The least of part R: the live steps change from a cold cache (TTFF, FPS, worst chunks), then the take replayed
  # in its own process; results are summarised after each run, so a call cut short keeps what ran.
  rm -rf "$TORCHINDUCTOR_CACHE_DIR"
  cold_live_changes 150
  take replay_live 120 live take
  ;;
R4)
  # Part R with the ladder that finds which layer breaks bit equality, if one does: the live steps change from a
  # cold cache (issue 16), the take on the default path (compile + CUDA graphs) replayed in the same process and
  # in a new one, then the same take compiled without graphs, then eager. Then the warm start. Ordered by need;
  # a call cut short keeps what ran.
  rm -rf "$TORCHINDUCTOR_CACHE_DIR"
  cold_live_changes 150
  take replay_live 120 live take
  take replay_new_process 70 replay take
  take replay_live_no_graphs 80 live take_ng --no-graphs
  take replay_live_eager 80 live take_e --eager
  warm_start 70 30 8
  ;;
R5)
  # Issue 24 after call 28's fix (eager calls noted by place): the take from a COLD cache (the most eager code:
  # everything compiles during it) replayed in its process and in a new one; the 2-step warm start in a new
  # process (TTFF after the warm-up fix: 149 ms expected, call 28: 238); then the take as
  # `serve --reproducible-takes` runs it (no timed choices), replayed in a new process. Limits sum to 560 s.
  rm -rf "$TORCHINDUCTOR_CACHE_DIR"
  take replay_live 220 live take
  take replay_new_process 70 replay take
  warm_start 80 20 6
  take replay_live_reproducible 110 live take_r --reproducible
  take replay_new_process_reproducible 70 replay take_r --reproducible
  ;;
R6)
  # Issue 24 after call 29 (a take from a cold cache: 0 of 148 frames identical even in its own process): the
  # take as `serve --reproducible-takes` runs it (no timed choices: cuDNN heuristics, Inductor deterministic),
  # from a cold cache, replayed in its process and in a new one; then what that mode costs (bench); then the
  # default take from the now warm cache in its process (call 28: 100 of 148). Limits sum to 560 s.
  rm -rf "$TORCHINDUCTOR_CACHE_DIR"
  take repro_live 220 live take_r --reproducible
  take repro_new_process 70 replay take_r --reproducible
  run repro_bench 90 $B --configs "batch,480x832,2,wan;batch,480x832,1,wan" --reproducible --chunks 12 \
    --warm-chunks 4 --json "$W/repro_bench.json"
  take default_live_warm 150 live take
  ;;
R7)
  # One call when device time is short (call 30): issue 24's reproducible take from a cold cache, replayed in
  # its process and in a new one; then issue 16's crash cases after the Wan VAE's start-order change (its
  # background compile now starts after a stream's first eager call): 2 and 1 step with live changes from a
  # cold default cache, the default config's warm start in a new process, LoRA. Limits sum to 560 s.
  rm -rf "$TORCHINDUCTOR_CACHE_DIR"
  take repro_live 200 live take_r --reproducible
  take repro_new_process 70 replay take_r --reproducible
  cold_live_changes 150
  warm_start 70 20 6
  run lora 70 $B --configs "batch,480x832,2,wan" --chunks 12 --warm-chunks 3 --lora-rank 32 --json "$W/lora.json"
  ;;
R8)
  # Part R7's first half when even less device time is left: the reproducible take from a cold cache,
  # replayed in its process and in a new one, then 2 and 1 step with live changes from a cold default cache.
  # Limits sum to 400 s.
  rm -rf "$TORCHINDUCTOR_CACHE_DIR"
  take repro_live 200 live take_r --reproducible
  take repro_new_process 70 replay take_r --reproducible
  cold_live_changes 130
  ;;
T)
  # Issue 24 after call 30 (a take from a cold cache differs from frame 0 even as `--reproducible-takes` runs,
  # in its own process): the same take with every counted call traced (`--trace`: exact digests of each
  # Wan VAE encode / decode and compiled site's input and output, and the math switches in force, live and
  # replayed), so the first call that differs names the stage; the take is replayed twice in its process (do
  # replays agree when nothing compiles beside them?) and once in a new one (against the live take and the
  # first replay). Then the default take the same way, VACE (the part of S call 30 left out), and last, with
  # what is left of the call, the VAE's full-resolution 3x3x3 convs through conv2d kernels.
  # Limits sum to 580 s (the call's own limit, 570 s, may cut the last).
  rm -rf "$TORCHINDUCTOR_CACHE_DIR"
  take trace_repro 180 live take_t --reproducible --trace
  take trace_repro_new_process 60 replay take_t --reproducible --trace
  take trace_default 170 live take_d --trace
  run vace 130 $B --configs "nobatch,480x832,2,vace" --chunks 12 --warm-chunks 4 --json "$W/vace.json"
  run vae_forms 40 python3 tools/gpu/vae_profile.py "$W/vae_forms.json" --reformulations-only
  ;;
T2)
  # Part T's issue-24 half, for what is left of a session after A and B (which ran VACE): the reproducible
  # take traced from a cold cache, replayed twice in its process and once in a new one; then the VAE's
  # full-resolution 3x3x3 convs through conv2d kernels. Limits sum to 290 s.
  rm -rf "$TORCHINDUCTOR_CACHE_DIR"
  take trace_repro 180 live take_t --reproducible --trace
  take trace_repro_new_process 60 replay take_t --reproducible --trace
  run vae_forms 50 python3 tools/gpu/vae_profile.py "$W/vae_forms.json" --reformulations-only
  ;;
T3)
  # After call 33 (part T2: a cold take's same-process replays agree with each other but not with the live
  # take, from the Wan VAE encoder's first compiled call on; a new process differs from the first DiT call on),
  # the same traced take with every tensor of each call's arguments and result digested (a DiT first half's
  # q, k, v; a VAE state's caches) and the compiles that ended during each call; then its new-process replay
  # from an EMPTY cache (does a fresh compile in another process compute what the live one did?); then the take
  # from an empty cache with the Wan VAE compiled in line (nothing compiling beside the stream: does the live
  # take then replay in its process?). Limits sum to 410 s.
  rm -rf "$TORCHINDUCTOR_CACHE_DIR"
  take trace_repro 150 live take_t --reproducible --trace
  rm -rf /tmp/inductor-fresh
  run trace_repro_new_process_cold 120 env TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-fresh \
    python3 tools/gpu/replay_check.py replay "$W/take_t" --reproducible --trace \
    --json "$W/trace_repro_new_process_cold.json"
  rm -rf "$TORCHINDUCTOR_CACHE_DIR"
  take trace_repro_vae_inline 140 live take_v --reproducible --trace --vae-inline
  ;;
T4)
  # After call 34 (the replay now runs each call in the live take's autograd mode, and the live take runs in
  # inference mode as the server's engine thread does): the traced reproducible take from an empty cache,
  # replayed in its process and in a new one; then the same with the Wan VAE compiled in line, so that no
  # compile runs beside the DiT's first one (call 34: a new process's DiT first half gave other q and k; torch
  # 2.11 keeps Inductor's config process-wide). Limits sum to 420 s.
  rm -rf "$TORCHINDUCTOR_CACHE_DIR"
  take trace_repro 150 live take_t --reproducible --trace
  take trace_repro_new_process 60 replay take_t --reproducible --trace
  rm -rf "$TORCHINDUCTOR_CACHE_DIR"
  take trace_inline 150 live take_v --reproducible --trace --vae-inline
  take trace_inline_new_process 60 replay take_v --reproducible --trace
  ;;
T6)
  # Issue 24, a suspect for a new process's other q and k (call 35): Python's string-hash seed, random per
  # process unless PYTHONHASHSEED is set. Inductor iterates sets and dicts of names while it generates a kernel;
  # another order can write the same sum in another order (or fuse another multiply-add), which rounds
  # otherwise — and a cache key that differs sends the new process to compile afresh. The CPU check (tiny
  # networks, C++ kernels) did not show it; Triton's may. The take with seed 0, its new-process replay with seed
  # 0, from the warm and from an empty cache, and with seed 1 (the control). The trace notes each tensor
  # argument's layout too (equal values in another layout reach other compiled code). Limits sum to 390 s.
  # (Assignments before a function call are exported to what it runs, for that call only.)
  rm -rf "$TORCHINDUCTOR_CACHE_DIR"
  PYTHONHASHSEED=0 take trace_seed0 150 live take_s --reproducible --trace
  PYTHONHASHSEED=0 take trace_seed0_new_process 60 replay take_s --reproducible --trace
  PYTHONHASHSEED=1 take trace_seed1_new_process 60 replay take_s --reproducible --trace
  rm -rf /tmp/inductor-fresh
  PYTHONHASHSEED=0 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-fresh \
    take trace_seed0_new_process_cold 120 replay take_s --reproducible --trace
  ;;
T7)
  # Issue 24 after calls 45-50 (Inductor timed its reduction kernels' launch configurations in each process:
  # the DiT's q/k RMSNorm ran with R0_BLOCK 1024 in the take's process, 512 in the next; deterministic mode did
  # not stop it): `--reproducible` now makes every kernel take its first configuration
  # (compile_settings.launch_configs_by_order). Does a new process then replay the take bit for bit? The
  # traced take, its new-process replay (every kernel object's configurations, a diff of the generated modules
  # only one process loaded), and where torch here writes `deterministic` into a kernel's metadata. Then what
  # the untimed choice costs: bench with --reproducible-takes' settings. Limits sum to 540 s.
  ind=$(python3 -c "import os, torch; print(os.path.dirname(torch.__file__))")/_inductor
  grep -n '"deterministic"' "$ind/codegen/triton.py" "$ind/codegen/simd.py" "$ind/runtime/triton_heuristics.py" \
    > "$W/inductor_deterministic.log" 2>&1; echo "0 0" > "$W/inductor_deterministic.rc"
  rm -rf "$TORCHINDUCTOR_CACHE_DIR"
  take untimed 190 live take_u --reproducible --trace
  take untimed_new_process 160 replay take_u --reproducible --trace
  run untimed_speed 190 $B --configs "batch,480x832,2,wan;batch,480x832,4,wan" --reproducible \
    --chunks 20 --warm-chunks 6 --json "$W/untimed_speed.json"
  ;;
P)
  # Where a steady chunk's time goes at 1-4 steps (480x832, stream batch, Wan VAE): kernel classes (GEMM,
  # attention, convolution, Triton, copies) and the top kernels (tools/gpu/chunk_profile.py).
  run chunk_profile 420 python3 tools/gpu/chunk_profile.py "$W/chunk_profile.json"
  ;;
W)
  # serve's warm-up (engine/warm_up.py): the warm-up streams' time, then a client's first stream after them —
  # TTFF, its chunks, live steps changes to 1, 3, 4, 2 steps — and what compiled after the warm-up (should be
  # nothing). Warm cache when part M ran before on this machine; `rm -rf "$TORCHINDUCTOR_CACHE_DIR"` first for
  # the empty-cache figure.
  run warm_up 400 python3 tools/gpu/warm_up_check.py "$W/warm_up.json"
  ;;
F8)
  # Issue 21 item 3: precision fp8 (float8 GEMMs in the fused q/k/v and FFN layers, models/fp8.py) against
  # bf16 in the same call: per layer at the stream's shapes with the quantisation fused as compiled, a
  # stream's frames fp8 vs bf16 (tools/gpu/fp8_layers.py), then the chunk at 2 and 4 steps and the low-memory
  # profile. Limits sum to 540 s.
  run fp8_layers 220 python3 tools/gpu/fp8_layers.py "$W/fp8_layers.json"
  cfg="batch,480x832,2,wan;batch,480x832,4,wan"
  run bench_bf16 110 $B --configs "$cfg" --chunks 20 --warm-chunks 6 --json "$W/bench_bf16.json"
  run bench_fp8 130 $B --configs "$cfg" --precision fp8 --chunks 20 --warm-chunks 6 --json "$W/bench_fp8.json"
  run lora_fp8 80 $B --configs "batch,480x832,2,wan" --precision fp8 --chunks 20 --warm-chunks 4 --lora-rank 32 \
    --json "$W/lora_fp8.json"
  ;;
FA1)
  # FlashAttention 4's stack is carried in two calls (tools/gpu/fa4_wheels.sh): this one leaves part a in /tmp.
  mkdir -p /tmp/fa4-parts && cp .whl-fa4a/* /tmp/fa4-parts/ && stamp "part a kept: $(ls /tmp/fa4-parts)"
  ;;
FA2)
  # The second call, on the same machine: FA4 put together and installed beside the image's torch, then the
  # DiT's attention shapes on every kernel (tools/gpu/attention_probe.py).
  part=$(ls /tmp/fa4-parts/*.part00 2>/dev/null) || { stamp "no part a in /tmp/fa4-parts: run FA1 first, on this machine"; exit 2; }
  wheel=/tmp/fa4-wheels/$(basename "${part%.part00}")
  mkdir -p /tmp/fa4-wheels && cat "$part" .whl-fa4b/*.part01 > "$wheel" && cp .whl-fa4b/*.whl /tmp/fa4-wheels/
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/fa4site /tmp/fa4-wheels/*.whl \
    && stamp "FA4 installed" || stamp "FA4 install failed"
  # The CUTLASS DSL's `cutlass` package sits in nvidia_cutlass_dsl/dsl_packages, put on sys.path by a .pth file
  # that Python reads only in a site directory, never on PYTHONPATH (call 44: "No module named 'cutlass'").
  fa4path="/tmp/fa4site:/tmp/fa4site/nvidia_cutlass_dsl/dsl_packages"
  run attention 240 env PYTHONPATH="$fa4path:${PYTHONPATH:-}" python3 tools/gpu/attention_probe.py "$W/attention.json"
  # The whole chunk with FA4 in the DiT (WANSTREAM_ATTENTION=fa4) against cuDNN's SDPA, same machine; needs PyAV
  # in /tmp/site from an earlier call on this machine (the carry cannot hold it beside FA4's stack).
  if python3 -c "import av" 2>/dev/null; then
    cfg="batch,480x832,2,wan;batch,480x832,4,wan"
    run bench_sdpa 150 $B --configs "$cfg" --chunks 20 --warm-chunks 6 --json "$W/bench_sdpa.json"
    run bench_fa4 150 env PYTHONPATH="$fa4path:${PYTHONPATH:-}" WANSTREAM_ATTENTION=fa4 \
      $B --configs "$cfg" --chunks 20 --warm-chunks 6 --json "$W/bench_fa4.json"
  else
    stamp "no PyAV in /tmp/site: run a part carrying .whl-av on this machine first for the bench with FA4"
  fi
  ;;
esac
summarize
