# Source on the device machine from the repo root: installs the carried wheels (.whl, made here by
# tools/gpu/wheels.sh), sets the paths.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
export PYTHONPATH=/tmp/site:$PWD/src:$PYTHONPATH PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=/tmp/wanstream-inductor
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader
python3 -c "import torch, pydantic, sys; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())"
