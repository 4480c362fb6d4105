#!/usr/bin/env bash
# The wheels a device call carries: the GPU image has torch, transformers, numpy, rich, httpx ... but not these,
# and nothing can be fetched there (the device's README). Run here, from the repo root, where pip reaches the
# registry; each wheel is the version this checkout's .venv holds (what CI tests), built for the image's
# Python 3.12. Writes .whl (installed by tools/gpu/env.sh) and .whl-av (PyAV: the matrix commands install it
# first); both are git-ignored. Carry them: carry [".whl", ".whl-av"] (64 MiB a call in all).
#   bash tools/gpu/wheels.sh            # bench, the matrix, replay_check
#   bash tools/gpu/wheels.sh --server   # also the server and its WebRTC stack (memory_calls.sh L*, live_path.py)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || { echo "wheels.sh: no $PY — run 'make demo' first (it makes .venv)" >&2; exit 2; }
CORE="pydantic pydantic-core annotated-types typing-inspection typing-extensions ftfy wcwidth"
SERVER="fastapi fastapi-offline starlette uvicorn websockets python-osc opentelemetry-api
aiortc aioice pylibsrtp pyee dnspython google-crc32c cryptography pyopenssl cffi pycparser ifaddr"
version() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
fetch() {  # fetch DIR NAME...: each NAME at this venv's version, as a cp312 manylinux (or pure Python) wheel
  local dir=$1; shift
  mkdir -p "$dir"
  for name in "$@"; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform manylinux_2_34_x86_64 --platform manylinux_2_31_x86_64 \
      -d "$dir" "$name==$(version "$name")"
  done
}
rm -rf .whl .whl-av
fetch .whl $CORE
[ "${1:-}" = "--server" ] && fetch .whl $SERVER
fetch .whl-av av
du -sh .whl .whl-av
