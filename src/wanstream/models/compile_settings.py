"""The torch.compile settings this process runs with, in force on every thread that compiles.

From torch 2.12 on, dynamo's and Inductor's config values are context-local (each one a ContextVar): a value
set on one thread is not seen by another, and a new thread starts from torch's defaults. wanstream compiles
on several threads — the stream's (a function's first shape), the helper that compiles new shapes
(`fastpath.COMPILES`), the Wan VAE's compile thread — and a server runs its streams on engine threads, not on
the one that optimised the networks. A value set once where the networks were optimised (a recompile limit,
Inductor's deterministic mode) silently did not hold where the compiles ran: a helper thread hit dynamo's
default limit of 8 signatures and left later shapes eager for good.

So the settings are declared here (`want`) and put in force by `apply()` at the top of every compiled call,
on whatever thread and context it runs: one ContextVar read when nothing changed. On torch <= 2.11 (one
process-wide config) `apply` finds them in force already.

`launch_configs_by_order` is the one process-wide behaviour kept here too: Inductor's kernels take their first
launch configuration instead of one timed in this process (reproducible takes).
"""

from __future__ import annotations

import contextvars
import importlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_WANTED: dict[tuple[str, str], Any] = {}  # (config module, name) -> value
_generation = 0  # bumped by every change of _WANTED
_lock = threading.Lock()
# The generation last put in force in this context (thread, or asyncio task's copy of one).
_applied: contextvars.ContextVar[int] = contextvars.ContextVar("wanstream_compile_settings", default=-1)


def want(module: str, name: str, value: Any) -> None:
    """From now on, `module.name` (e.g. "torch._dynamo.config", "recompile_limit") is `value` on every
    thread that compiles; in force on this one at once. An unknown name raises AttributeError."""
    global _generation
    config = importlib.import_module(module)
    if not hasattr(config, name):
        raise AttributeError(f"{module}.{name} does not exist in torch here")
    with _lock:
        if (module, name) not in _WANTED or _WANTED[(module, name)] != value:
            _WANTED[(module, name)] = value
            _generation += 1
    apply()


def wanted(module: str, name: str) -> Any:
    """The value `want` declared, else this thread's current value."""
    with _lock:
        if (module, name) in _WANTED:
            return _WANTED[(module, name)]
    return getattr(importlib.import_module(module), name)


def apply() -> None:
    """Put the wanted settings in force in this thread's context (cheap when they already are)."""
    if _applied.get() == _generation:
        return
    with _lock:
        items, generation = list(_WANTED.items()), _generation
    for (module, name), value in items:
        config = importlib.import_module(module)
        if getattr(config, name) != value:
            setattr(config, name, value)
    _applied.set(generation)


@contextmanager
def kept() -> Iterator[None]:
    """Tests: whatever is wanted inside is forgotten on exit (this thread's values are restored by the
    caller's `config.patch`)."""
    global _generation
    with _lock:
        before = dict(_WANTED)
    try:
        yield
    finally:
        with _lock:
            _WANTED.clear()
            _WANTED.update(before)
            _generation += 1


# Inductor's Triton kernels (norms, fused elementwise) have several launch configurations — block sizes, warps —
# and Inductor times them at a kernel's first run in each process, keeping the fastest. A reduction summed with
# another block size rounds otherwise, so a new process replaying a take could compute other bits: measured on an
# H100 with torch 2.11 (docs/benchmarks.md, calls 47-50: the DiT's q/k RMSNorm ran with R0_BLOCK 1024 in one
# process, 512 in the next), deterministic mode asked for or not. For reproducible takes, the choice is made
# without timing: each kernel runs its first configuration, in every process.
_UNTIMED = "_wanstream_untimed"


def _autotuner() -> Any:
    """Inductor's Triton autotuner class, if this torch has one with a per-configuration timing (`bench`)."""
    try:
        from torch._inductor.runtime.triton_heuristics import CachingAutotuner
    except ImportError:
        return None
    return CachingAutotuner if hasattr(CachingAutotuner, "bench") else None


def launch_configs_by_order() -> bool:
    """From now on, every Triton kernel Inductor compiles in this process picks its first launch configuration
    instead of the fastest one timed here (process-wide; for `Components.optimize(reproducible=True)`). False
    where this torch has no such choice to make (no Triton autotuner)."""
    autotuner = _autotuner()
    if autotuner is None:
        return False
    if not launch_configs_untimed():

        def by_order(self: Any, launcher: Any, *args: Any, **kwargs: Any) -> float:
            # The "time" a timed choice compares: its place in the kernel's list, so the first one wins. A
            # configuration outside the list (coordinate-descent tuning's trials, if someone turns it on) never
            # beats the one in place.
            return float(self.launchers.index(launcher)) if launcher in self.launchers else float("inf")

        setattr(by_order, _UNTIMED, True)
        autotuner.bench = by_order
    # A configuration timed by another process and kept in the compile cache must not be read back either.
    config = importlib.import_module("torch._inductor.config")
    if hasattr(config, "autotune_local_cache"):
        want("torch._inductor.config", "autotune_local_cache", False)
    return True


def launch_configs_untimed() -> bool:
    """Whether `launch_configs_by_order` is in force in this process."""
    autotuner = _autotuner()
    return autotuner is not None and bool(getattr(autotuner.bench, _UNTIMED, False))
