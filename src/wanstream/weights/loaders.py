"""Official checkpoint files → wanstream modules, with strict key checks and errors that name the file.

Every weight a user's real checkpoint holds goes through these functions, and so do the golden
conformance cases: there is no test-only weight path.

Memory: files are memory-mapped (`.safetensors`, zip-format `.pt`/`.pth`), modules are built on the
meta device, and tensors are assigned into them rather than copied. A tensor whose dtype and device
already match is used in place (no copy at all); otherwise it is converted one tensor at a time. So
loading never holds two full copies of a model in RAM.
"""

from __future__ import annotations

import json
import os
import pickle
import types
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

StateDict = dict[str, torch.Tensor]
# What a loader takes: a checkpoint file (or folder, where the loader says so), or a state dict in memory.
CheckpointSource = str | Path | Mapping[str, torch.Tensor]
M = TypeVar("M", bound=nn.Module)

FLOAT8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
ENV_ALLOW_PICKLE = "WANSTREAM_ALLOW_PICKLE"

# Wrappers seen in the wild around a generator state dict, in the order the reference tries them.
_GENERATOR_KEYS = ("generator", "generator_ema", "state_dict")
_PREFIXES = ("_fsdp_wrapped_module.", "model.", "diffusion_model.")
_LFS_POINTER = b"version https://git-lfs"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what was expected."""


def read_checkpoint(path: str | Path, *, allow_pickle: bool | None = None) -> Any:
    """Read a `.safetensors`, `.pt`, `.pth` or `.bin` file, or a sharded `*.index.json` (memory-mapped).

    Pickles are read with `weights_only=True`: tensors and plain containers only, no code runs.
    `allow_pickle=True` (or WANSTREAM_ALLOW_PICKLE=1) lifts that for files you trust.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder; pass the checkpoint file inside it")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file. {download_hint(path)}")
    _reject_non_checkpoints(path)
    if path.name.endswith(".index.json"):
        return _read_sharded(path, allow_pickle)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))  # lazily memory-mapped: no copy until a tensor is used
        return _torch_load(path, allow_pickle)
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(
            f"{path}: not a readable checkpoint, truncated or corrupt ({type(exc).__name__}: "
            f"{_first_line(exc)}). {download_hint(path, repair=True)}"
        ) from exc


def _torch_load(path: Path, allow_pickle: bool | None) -> Any:
    if allow_pickle is None:
        allow_pickle = os.environ.get(ENV_ALLOW_PICKLE, "").strip().lower() in ("1", "true", "yes", "on")
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:  # legacy (pre-zip) serialization cannot be memory-mapped
            if "mmap" not in str(exc).lower() and "zip" not in str(exc).lower():
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not allow_pickle:
            raise CheckpointError(
                f"{path}: holds Python objects besides tensors, which wanstream does not unpickle "
                f"(unpickling can run code). If you trust this file, set {ENV_ALLOW_PICKLE}=1 "
                f"or pass allow_pickle=True. ({_first_line(exc)})"
            ) from exc
    return torch.load(path, map_location="cpu", weights_only=False, mmap=True)


def _read_sharded(index: Path, allow_pickle: bool | None) -> StateDict:
    """A `*.safetensors.index.json` / `*.bin.index.json` and the shards it names, as one state dict."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index}: not a shard index (expected a 'weight_map' object)") from exc
    sd: StateDict = {}
    for shard in sorted(set(weight_map.values())):
        part = read_checkpoint(index.parent / shard, allow_pickle=allow_pickle)
        sd.update(as_state_dict(part, str(index.parent / shard)))
    missing = [k for k in weight_map if k not in sd]
    if missing:
        raise CheckpointError(f"{index}: the shards lack keys the index names, e.g. {missing[:3]}")
    return sd


def _reject_non_checkpoints(path: Path) -> None:
    """Catch the usual impostors before a parser produces a cryptic error."""
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path}: is empty (0 bytes). {download_hint(path, repair=True)}")
    with path.open("rb") as f:
        head = f.read(64)
    if head.startswith(_LFS_POINTER):
        raise CheckpointError(
            f"{path}: is a Git LFS pointer ({size} bytes), not the weights; the repository was cloned "
            f"without LFS. {download_hint(path)}"
        )
    if head.lstrip()[:15].lower().startswith((b"<!doctype", b"<html")):
        raise CheckpointError(
            f"{path}: is an HTML page, not a checkpoint (an error or login page saved by a download "
            f"tool?). {download_hint(path, repair=True)}"
        )


def download_hint(path: str | Path, *, repair: bool = False) -> str:
    """What to run to (re)fetch `path` when it is a registry file; a generic pointer otherwise."""
    from wanstream.weights.registry import find_artifact
    from wanstream.weights.store import download_command, resolve_models_dir

    posix = Path(path).absolute().as_posix()
    found = find_artifact(posix)
    if found is None:
        return "Official model files are fetched with `wanstream download` (see `wanstream models`)."
    pipeline, artifact = found
    verify = " --verify" if repair else ""
    rel = artifact.local_relpath()
    if posix.endswith("/" + rel):  # inside a models folder: fetch into that same folder
        root = Path(posix[: -len(rel) - 1])
        return f"Fetch it with `{download_command([artifact], root, pipeline.name)}{verify}`."
    root = resolve_models_dir()
    return (
        f"It looks like the {artifact.description} ({artifact.repo_id}: {artifact.path}); "
        f"`{download_command([artifact], root, pipeline.name)}{verify}` fetches it into {root}."
    )


def as_state_dict(obj: Any, source: str) -> StateDict:
    """Require a flat mapping of names to tensors."""
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{source}: not a state dict (got {type(obj).__name__})")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{source}: not a state dict of tensors (e.g. entry {bad[0]!r})")
    return dict(obj)


def read_state_dict(checkpoint: CheckpointSource, source: str | None = None) -> tuple[str, StateDict]:
    """A checkpoint file read (or a state dict taken as it is), with the name errors will give it: `source`,
    else the path (or "<state dict>")."""
    if isinstance(checkpoint, Mapping):
        name = source or "<state dict>"
        return name, as_state_dict(checkpoint, name)
    name = source or str(checkpoint)
    return name, as_state_dict(read_checkpoint(checkpoint), name)


def unwrap_generator(obj: Any, source: str) -> StateDict:
    """A DiT state dict from any generator checkpoint layout.

    Accepts `{"generator" | "generator_ema" | "state_dict": sd}` (StreamDiffusionV2 / Self-Forcing
    `model.pt`) or a raw state dict, and strips the `model.` / `_fsdp_wrapped_module.` /
    `diffusion_model.` prefixes when every key carries them.
    """
    if isinstance(obj, Mapping):
        for key in _GENERATOR_KEYS:
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
        else:
            nested = [k for k, v in obj.items() if isinstance(v, Mapping)]
            if nested and not any(isinstance(v, torch.Tensor) for v in obj.values()):
                raise CheckpointError(
                    f"{source}: a checkpoint with entries {nested[:5]} but none of "
                    f"{list(_GENERATOR_KEYS)}; expected a generator state dict"
                )
    sd = as_state_dict(obj, source)
    return strip_prefixes(sd)


def strip_prefixes(sd: StateDict, prefixes: tuple[str, ...] = _PREFIXES) -> StateDict:
    changed = True
    while changed:
        changed = False
        for prefix in prefixes:
            if all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix) :]: v for k, v in sd.items()}
                changed = True
    return sd


def check_keys(module: nn.Module, sd: Mapping[str, torch.Tensor], source: str, *, limit: int = 5) -> None:
    """Raise a CheckpointError naming the first offending keys when `sd` does not fit `module` exactly."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    mismatched = [
        f"{k} (file {tuple(sd[k].shape)}, model {tuple(expected[k].shape)})"
        for k in expected
        if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    for label, keys in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("wrong shapes", mismatched),
    ):
        if keys:
            shown = ", ".join(keys[:limit]) + (f", … ({len(keys)} in all)" if len(keys) > limit else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise CheckpointError(f"{source}: does not match {type(module).__name__}: " + "; ".join(problems))


def load_into(
    module: M,
    sd: Mapping[str, torch.Tensor],
    source: str,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> M:
    """Strict-load `sd` into `module` (which may live on the meta device).

    Floating-point tensors become `dtype`, or, with `dtype=None`, whatever dtype the module's own
    tensor has (so a module prepared with float8 linear weights keeps them float8, see
    `upcast_per_call`). Float8 weights loaded with a wider `dtype` are upcast here, once.
    Tensors are assigned, not copied: one already in the right dtype and device is used in place.
    """
    check_keys(module, sd, source)
    expected = module.state_dict()
    target_device = torch.device(device) if device is not None else torch.device("cpu")
    converted = {}
    for name, tensor in sd.items():
        want = expected[name].dtype
        if dtype is not None and tensor.is_floating_point() and want.is_floating_point:
            want = dtype
        converted[name] = tensor.to(device=target_device, dtype=want)
    module.load_state_dict(converted, strict=True, assign=True)
    if device is not None:
        module.to(device)
    left = [n for n, t in (*module.named_parameters(), *module.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(
            f"{source}: {type(module).__name__} still has unloaded tensors after loading "
            f"({', '.join(left[:5])}): non-persistent buffers must be computed lazily, not at construction"
        )
    return module


def build_on_meta(factory: Callable[[], M]) -> M:
    """Construct a module without allocating its parameters."""
    with torch.device("meta"):
        return factory()


def upcast_per_call(module: M) -> M:
    """Let every `nn.Linear` whose weight is stored in float8 compute in its input's dtype.

    The weight stays float8 in memory (half of bf16) and is upcast for each call: one layer's worth
    of temporary memory at a time. (On GPUs with float8 matmuls a later pass can use them instead.)
    """
    for layer in module.modules():
        if isinstance(layer, nn.Linear) and layer.weight.dtype in FLOAT8_DTYPES:
            layer.forward = types.MethodType(_upcast_linear_forward, layer)  # type: ignore[method-assign]
    return module


def _upcast_linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    bias = None if self.bias is None else self.bias.to(x.dtype)
    return F.linear(x, self.weight.to(x.dtype), bias)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
