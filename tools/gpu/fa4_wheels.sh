#!/usr/bin/env bash
# FlashAttention 4 (CuTe DSL: pure Python kernels JIT-compiled for SM90) and its stack, for a device call that
# measures it (tools/gpu/attention_probe.py; issue "Performance II" item 2). The stack is ~100 MB, over one
# call's 64 MiB carry: the CUTLASS DSL's CUDA 13 library wheel is split in two, carried by two calls back to
# back on the same machine (files under /tmp stay while it is held):
#   bash tools/gpu/fa4_wheels.sh                         # here: writes .whl-fa4a and .whl-fa4b (git-ignored)
#   call 1, carry [".whl-fa4a"]:          bash tools/gpu/matrix.sh FA1   # keeps part a in /tmp
#   call 2, carry [".whl-fa4b", ".whl"]:  source tools/gpu/env.sh && bash tools/gpu/matrix.sh FA2
# FA2 also benches the chunk with WANSTREAM_ATTENTION=fa4 against SDPA when PyAV is in /tmp/site already (any
# earlier part on the machine that carried .whl-av, e.g. `matrix.sh M`).
# The GPU image already has cuda-bindings, cuda-pathfinder, protobuf and einops (the device's KINDS.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
W=$(mktemp -d)
fetch() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 -d "$W" "$@"
}
fetch flash-attn-4==4.0.0b40 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 \
  nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 apache-tvm-ffi==0.1.15.post2 \
  torch-c-dlpack-ext==0.1.5 quack-kernels==0.6.5
rm -rf .whl-fa4a .whl-fa4b && mkdir -p .whl-fa4a .whl-fa4b
big=$(ls "$W"/nvidia_cutlass_dsl_libs_cu13-*.whl)
split -b 48M -d "$big" ".whl-fa4a/$(basename "$big").part"
mv .whl-fa4a/*.part01 .whl-fa4b/  # part 00 goes in call 1, part 01 in call 2
rm "$big" && mv "$W"/*.whl .whl-fa4b/ && rmdir "$W"
du -sh .whl-fa4a .whl-fa4b
