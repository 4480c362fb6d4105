"""Official checkpoint files → wanstream modules, with strict key checks and errors that name the file.

Every weight a user's real checkpoint holds goes through these functions, and so do the golden
conformance cases: there is no test-only weight path.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

StateDict = dict[str, torch.Tensor]
M = TypeVar("M", bound=nn.Module)

# Wrappers seen in the wild around a generator state dict, in the order the reference tries them.
_GENERATOR_KEYS = ("generator", "generator_ema", "state_dict")
_PREFIXES = ("_fsdp_wrapped_module.", "model.", "diffusion_model.")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what was expected."""


def read_checkpoint(path: str | Path) -> Any:
    """Read a `.safetensors`, `.pt`, `.pth` or `.bin` file (memory-mapped where the format allows)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc).lower() and "zip" not in str(exc).lower():
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from exc


def as_state_dict(obj: Any, source: str) -> StateDict:
    """Require a flat mapping of names to tensors."""
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{source}: not a state dict (got {type(obj).__name__})")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{source}: not a state dict of tensors (e.g. entry {bad[0]!r})")
    return dict(obj)


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
    """Strict-load `sd` into `module` (which may live on the meta device), casting to `dtype`.

    Tensors are assigned, not copied, so a meta-device module costs no second copy of the weights.
    Float8 weights are upcast to `dtype` here.
    """
    check_keys(module, sd, source)
    expected = module.state_dict()
    converted = {}
    for name, tensor in sd.items():
        target_dtype = dtype if (dtype is not None and tensor.is_floating_point()) else expected[name].dtype
        if not tensor.is_floating_point():
            target_dtype = expected[name].dtype
        converted[name] = tensor.to(device=device or "cpu", dtype=target_dtype)
    module.load_state_dict(converted, strict=True, assign=True)
    if device is not None:
        module.to(device)
    return module


def build_on_meta(factory: Callable[[], M]) -> M:
    """Construct a module without allocating its parameters."""
    with torch.device("meta"):
        return factory()
