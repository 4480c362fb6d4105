"""What "the same model" means for a replay: the weights' files (sha256), dtype, precision, device kind.

A replay is bit for bit only on the same device kind, dtype and model files; anywhere else it runs and the
report says what differs. File digests of multi-GB checkpoints take seconds, so they are cached by
(path, size, mtime) in ~/.cache/wanstream/file-digests.json; a Hugging Face cache blob is already named by
its sha256 and is not read at all.
"""

from __future__ import annotations

import json
import os
import platform
import re
import secrets
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import wanstream
from wanstream.engine.components import Components
from wanstream.engine.journal import JournalOp
from wanstream.models import compile_settings
from wanstream.models.fp8 import computes_in_float8
from wanstream.weights.store import sha256_file

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
PROCESS = secrets.token_hex(8)  # this process: a replay in the live stream's own process shares its choices
_CACHE_LOCK = threading.Lock()
# Compared between the live take and the replay; the rest (versions, paths) is reported, not compared.
COMPARED = (
    "label", "dtype", "precision", "device_kind", "cpu_threads", "cudnn_benchmark", "weights_seed", "files", "loras"
)  # fmt: skip


def digest_cache_path() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "wanstream" / "file-digests.json"


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The sha256 of a file (a Hugging Face blob's own name when it is one; else cached by size and mtime)."""
    real = Path(path).resolve()
    if real.parent.name == "blobs" and _HEX64.match(real.name):
        return real.name
    stat = real.stat()
    key = f"{real}|{stat.st_size}|{stat.st_mtime_ns}"
    cache_file = digest_cache_path()
    with _CACHE_LOCK:
        cache = _read_cache(cache_file)
        if key in cache:
            return str(cache[key])
    digest = sha256_file(real)
    with _CACHE_LOCK:
        cache = _read_cache(cache_file)
        cache[key] = digest
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_name(f".{cache_file.name}.{os.getpid()}.part")
            tmp.write_text(json.dumps(cache, indent=0))
            os.replace(tmp, cache_file)
        except OSError:
            pass  # a read-only home: digests are recomputed next time
    return digest


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def device_kind(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({_cpu_model() or platform.machine()})"


def cpu_threads(device: torch.device) -> int | None:
    """torch's intra-op threads on the CPU: how a reduction is split, so part of a CPU replay's identity
    (measured: a LoRA-merged demo stream differs at 1 vs 2 threads). None on a GPU (kernels do not use them)."""
    return torch.get_num_threads() if device.type == "cpu" else None


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def lora_names(settings: dict[str, Any], ops: Sequence[JournalOp]) -> list[str]:
    """Every LoRA a take's settings named, at its start or in a live update."""
    names = {lo["path"] for lo in settings.get("loras") or []}
    for op in ops:
        if op.target == "session" and op.name == "update":
            names |= {lo["path"] for lo in op.args.get("update", {}).get("loras") or []}
    return sorted(names)


def lora_files(components: Components, names: Sequence[str]) -> dict[str, str]:
    """LoRA name → the file it names here (as the components' LoRA source resolves it; unresolvable names
    are left out, and a comparison then shows them missing)."""
    from wanstream.weights.lora import LoraError, resolve_lora_path

    source = components.lora_source
    found = {}
    for name in names:
        try:
            path = resolve_lora_path(
                name, getattr(source, "lora_dir", None), confine=bool(getattr(source, "confine", False))
            )
        except LoraError:
            continue
        found[name] = str(path)
    return found


def model_identity(components: Components, loras: Sequence[str] = ()) -> dict[str, Any]:
    """The identity of `components`, and of the LoRA files named `loras`, as a log records it."""
    files = lora_files(components, loras)
    return {
        "label": components.label,
        "demo": components.demo,
        "random_weights": components.random_weights,
        "tiny": components.tiny,
        "weights_seed": components.weights_seed,
        "dtype": str(components.dtype).removeprefix("torch."),
        "precision": components.precision,
        # Reported, not compared: the same device kind and precision make the same choice (`fp8.float8_gemms`).
        "float8_gemms": computes_in_float8(components.dit),
        "text_placement": components.text_placement,
        "device": str(components.device),
        "device_kind": device_kind(components.device),
        "cpu_threads": cpu_threads(components.device),
        # cuDNN picks each conv's algorithm by timing it once per process (`Components.optimize`): another
        # process may pick another, which rounds differently.
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark) if components.device.type == "cuda" else None,
        "inductor_deterministic": _inductor_deterministic() if components.device.type == "cuda" else None,
        # The optimised GPU path (compile + CUDA graphs): another process's compiled code may round otherwise.
        "optimized": components.optimized,
        # Python's string-hash seed (None: random per process). Suspected of the new-process difference on the
        # GPU and ruled out by call 42 (tools/gpu/matrix.sh T6); kept, as the log's record of the process.
        "hash_seed": os.environ.get("PYTHONHASHSEED"),
        "process": PROCESS,
        "files": {
            role: {"path": p, "sha256": file_sha256(p)} for role, p in sorted(components.files.items())
        },
        "loras": {name: {"path": p, "sha256": file_sha256(p)} for name, p in sorted(files.items())},
        "wanstream": wanstream.__version__,
        "torch": torch.__version__,
    }


def _inductor_deterministic() -> bool:
    """Whether Inductor chooses its kernels' launch configurations without timing them
    (`Components.optimize(reproducible=)`: its deterministic mode on the threads that compile — not necessarily
    this one, `models.compile_settings` — and every kernel's first configuration, process-wide)."""
    import torch._inductor.config as inductor_config

    if not hasattr(inductor_config, "deterministic") or not compile_settings.launch_configs_untimed():
        return False
    return bool(compile_settings.wanted("torch._inductor.config", "deterministic"))


def differences(recorded: dict[str, Any], here: dict[str, Any]) -> list[str]:
    """What differs between the take's identity and this one, in words (empty: a bit-for-bit replay)."""
    found = []
    for key in COMPARED:
        a, b = recorded.get(key), here.get(key)
        if key in ("files", "loras"):
            a = {k: v["sha256"] for k, v in (a or {}).items()}
            b = {k: v["sha256"] for k, v in (b or {}).items()}
        if a != b:
            found.append(f"{key}: the take had {_short(a)}, this run has {_short(b)}")
    if (
        recorded.get("cudnn_benchmark")
        and here.get("cudnn_benchmark")
        and recorded.get("process") != here.get("process")
    ):
        found.append(
            "process: cuDNN chose the take's convolution algorithms (and Inductor its kernels' configurations) by "
            "timing them in the live stream's process (torch.backends.cudnn.benchmark); this process may choose "
            "others, which round differently (a replay on the server that streamed the take — the studio's "
            "Replay take — uses the same ones; a server started with --reproducible-takes makes both choices "
            "without timing, the same in every process)"
        )
    if recorded.get("optimized") and here.get("optimized") and recorded.get("process") != here.get("process"):
        found.append(
            "process: the take ran on the optimised GPU path (compiled code, CUDA graphs), and another process's "
            "compiled code may compute other bits for the same input: Inductor times its reduction kernels' launch "
            "configurations in each process (measured on an H100 with torch 2.11; --reproducible-takes now picks "
            "them without timing, not yet confirmed on a GPU: docs/replay.md), so frames may differ slightly; a "
            "replay on the server that streamed the take — the studio's Replay take — is bit for bit"
        )
    for key in ("wanstream", "torch"):
        if recorded.get(key) != here.get(key):
            found.append(f"{key} version: the take had {recorded.get(key)}, this run has {here.get(key)}")
    return found


def _short(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {str(v)[:12]}" for k, v in value.items()) + "}"
    return repr(value)
