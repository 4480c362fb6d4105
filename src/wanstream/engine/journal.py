"""The session journal: every call that changed a stream, in order, with the frames it was given.

The engine is deterministic: the same calls, with the same frames, on the same device kind, dtype and model
files, give the same output bit for bit (the noise of chunk k is keyed by k and the seed; every live change
takes effect between chunks). So a live take is reproduced by recording the calls and running them again
(`wanstream.takes.replay`). A journal records the public calls of a `StreamSession`, and of its VACE
conditioner, that change the stream:

* a call is recorded after it succeeds — a rejected call changed nothing;
* calls made inside a recorded call (a prompt cut resets the stream, VACE's `push` generates chunks) are part
  of it and not recorded again;
* each record keeps how many output frames the call returned, so a replay can check it frame for frame;
* frames go to a `FrameStore` (in memory here; the server writes them to disk as they come,
  `wanstream.takes.store`), the records keep only small JSON-able values.

Output digests (`note_output`) are added by whoever holds the output on the host (the server's worker hands
every frame it sends), so the engine never copies its output off the device for the journal.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np
import torch

from wanstream.engine.frames import as_tensor
from wanstream.models import numerics

JOURNAL_VERSION = 1
FRAMES = "$frames"  # an argument stored in the frame store: {"$frames": key}
CONDITIONER = "$conditioner"  # an attached conditioner: {"$conditioner": its journal_spec()}


class FrameStore(Protocol):
    """Where a journal keeps the frames of its calls (CPU tensors), by key."""

    nbytes: int

    def add(self, frames: torch.Tensor) -> int: ...

    def get(self, key: int) -> torch.Tensor: ...


class MemoryFrames:
    """Frames kept in memory (the Python API's default; the server stores them on disk instead)."""

    def __init__(self) -> None:
        self._items: list[torch.Tensor] = []
        self.nbytes = 0

    def add(self, frames: torch.Tensor) -> int:
        self._items.append(frames)
        self.nbytes += frames.numel() * frames.element_size()
        return len(self._items) - 1

    def get(self, key: int) -> torch.Tensor:
        return self._items[key]

    def __len__(self) -> int:
        return len(self._items)


@dataclass
class JournalOp:
    """One recorded call: `target` ("session" or "vace"), the method, its arguments (frames by key)."""

    index: int
    target: str
    name: str
    args: dict[str, Any]
    outputs: int  # output frames the call returned
    first_output: int  # the session's output frame index of the first of them
    time: float  # seconds since the journal started (for timelines; a replay does not wait)
    # Calls that ran eager code where compiled code exists (still compiling, failed, or another thread's compile
    # tracing), by site and place among the site's calls: a replay runs them the same way (models/numerics.py),
    # since compiled and eager code round differently.
    eager: dict[str, list[int]] = field(default_factory=dict)
    # The DiT steps (by place among the call's steps) that replayed a CUDA graph; None: not noted (logs written
    # before 2026-12-07), the replay then uses graphs as it can.
    graphs: list[int] | None = None
    # The autograd mode the call ran in (`GRAD_MODES`): compiled code is specialised on it, and the two
    # specialisations may round differently (seen on an H100: a Wan VAE half compiled in grad mode and in
    # inference mode gave other bits for one input), so a replay runs each call in its mode. Logs written before
    # 2026-12-07 lack it: their calls ran in inference mode (the server's and generate's).
    grad_mode: str = "inference"

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "target": self.target,
            "name": self.name,
            "args": self.args,
            "outputs": self.outputs,
            "first_output": self.first_output,
            "time": round(self.time, 6),
            "eager": self.eager,
            "graphs": self.graphs,
            "grad_mode": self.grad_mode,
        }

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> JournalOp:
        return cls(
            index=int(row["index"]),
            target=str(row["target"]),
            name=str(row["name"]),
            args=dict(row["args"]),
            outputs=int(row["outputs"]),
            first_output=int(row["first_output"]),
            time=float(row["time"]),
            eager={str(k): _places(v) for k, v in row.get("eager", {}).items()},
            graphs=None if row.get("graphs") is None else [int(v) for v in row["graphs"]],
            grad_mode=check_grad_mode(row.get("grad_mode", "inference")),
        )


GRAD_MODES = ("inference", "no_grad", "grad")


def current_grad_mode() -> str:
    """This thread's autograd mode, as a `JournalOp` notes it."""
    if torch.is_inference_mode_enabled():
        return "inference"
    return "grad" if torch.is_grad_enabled() else "no_grad"


def autograd_mode(mode: str) -> AbstractContextManager[Any]:
    """Enter the autograd mode `mode` (one of `GRAD_MODES`) for a replayed call."""
    if mode == "inference":
        return torch.inference_mode()
    stack = ExitStack()
    stack.enter_context(torch.inference_mode(False))
    stack.enter_context(torch.set_grad_enabled(mode == "grad"))
    return stack


def check_grad_mode(value: Any) -> str:
    """`value` if it names an autograd mode (`GRAD_MODES`), else ValueError."""
    if value not in GRAD_MODES:
        raise ValueError(f"grad_mode {value!r} is not one of {', '.join(GRAD_MODES)}")
    return str(value)


def _places(value: Any) -> list[int]:
    """A site's eager calls: their places; the first logs gave a number n, the places 0 .. n-1 then."""
    return list(range(int(value))) if isinstance(value, int) else [int(v) for v in value]


@dataclass
class SessionJournal:
    """The record of one session from its creation (see the module docstring)."""

    settings: dict[str, Any]  # the session's settings at creation (JSON)
    output: str  # the session's output format ("uint8" | "float")
    frames: Any = field(default_factory=MemoryFrames)  # a FrameStore
    limit_bytes: int | None = None  # stop recording (truncate) once the stored frames exceed this
    ops: list[JournalOp] = field(default_factory=list)
    digests: dict[int, str] = field(default_factory=dict)  # output frame index → sha256 of its bytes
    # Why a replay cannot reproduce this session (a custom noise source, a restored snapshot, ...), if so.
    unreplayable: str | None = None
    truncated: str | None = None  # why recording stopped early (the ops before it still replay)
    depth: int = 0  # > 0 while a recorded call runs (calls it makes are part of it)
    frames_out: int = 0  # output frames returned by recorded calls so far
    # The autograd mode the session was created in (`GRAD_MODES`; set by the session): its buffers are inference
    # tensors exactly when it is "inference", and compiled code is specialised on that too.
    grad_mode: str = "inference"
    _start: float = field(default_factory=time.monotonic)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def recording(self) -> bool:
        return self.unreplayable is None and self.truncated is None

    def mark_unreplayable(self, reason: str) -> None:
        if self.unreplayable is None:
            self.unreplayable = reason

    def record(
        self,
        target: str,
        name: str,
        arguments: dict[str, Any],
        out: Any,
        ran: numerics.Ran | None = None,
        mode: str = "inference",
    ) -> None:
        """Record a call that returned `out` (its arguments by parameter name, `self` left out; `ran`: which
        calls of compiled sites it ran eagerly and which steps on CUDA graphs, `models.numerics`; `mode`: the
        autograd mode it ran in, `current_grad_mode`)."""
        count = int(out.shape[0]) if isinstance(out, torch.Tensor) and out.dim() == 4 else 0
        first, self.frames_out = self.frames_out, self.frames_out + count
        if not self.recording:
            return
        try:
            args = {k: self._value(v) for k, v in arguments.items()}
        except (TypeError, ValueError) as exc:  # an argument the journal cannot keep: never fail the call
            self.mark_unreplayable(f"{target}.{name}: {exc}")
            return
        except OSError as exc:  # the frame store could not take them (its writer fell behind, disk full)
            self.truncated = f"call {len(self.ops)} ({target}.{name}) could not be stored: {exc}"
            return
        if self.limit_bytes is not None and self.frames.nbytes > self.limit_bytes:
            self.truncated = (
                f"the log reached its size limit ({self.limit_bytes / 2**20:.0f} MiB of frames) at call "
                f"{len(self.ops)}; it replays the take up to output frame {first}"
            )
            return
        self.ops.append(
            JournalOp(
                len(self.ops),
                target,
                name,
                args,
                count,
                first,
                time.monotonic() - self._start,
                dict(ran.eager) if ran is not None else {},
                list(ran.graphs) if ran is not None else [],
                mode,
            )
        )

    def mark(self, name: str) -> None:
        """A moment of the take that changes nothing in the engine (a pause, a resume): recorded for the story
        (timelines, a reader of the log) as target "marker"; a replay skips it."""
        if self.recording:
            self.ops.append(
                JournalOp(
                    len(self.ops), "marker", name, {}, 0, self.frames_out, time.monotonic() - self._start
                )
            )

    def note_output(self, index: int, image: np.ndarray | torch.Tensor) -> None:
        """The sha256 of output frame `index` as it was sent (any thread; host memory)."""
        data = image.numpy() if isinstance(image, torch.Tensor) else image
        digest = frame_digest(data)
        with self._lock:
            self.digests[index] = digest

    def _value(self, value: Any) -> Any:
        """An argument as JSON, its frames in the frame store."""
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if hasattr(value, "journal_spec"):  # a conditioner (VACE): how to build it again
            return {CONDITIONER: value.journal_spec()}
        if hasattr(value, "model_dump"):  # pydantic: settings updates, prompts, transitions
            return value.model_dump(mode="json", exclude_unset=True)
        if isinstance(value, dict):
            return {str(k): self._value(v) for k, v in value.items()}
        if isinstance(value, (torch.Tensor, np.ndarray)) or hasattr(value, "convert"):
            return {FRAMES: self.frames.add(_host_copy(as_tensor(value)))}
        if isinstance(value, (list, tuple)):  # element by element: a replay passes the same list back
            return [self._value(v) for v in value]
        raise TypeError(f"cannot record an argument of type {type(value).__name__}")


def frame_digest(image: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()


def _host_copy(x: torch.Tensor) -> torch.Tensor:
    """A CPU copy the caller cannot change afterwards (the caller may reuse its buffer). Half-precision
    values are widened to float32 (exactly; files have no bfloat16, and the session casts them back)."""
    wide = torch.float32 if x.dtype in (torch.bfloat16, torch.float16) else x.dtype
    return x.detach().to("cpu", dtype=wide, copy=True)


T = TypeVar("T")


def recorded(target: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Marks a public method whose successful calls the owner's journal records (`target` names the owner)."""

    def decorate(method: Callable[..., T]) -> Callable[..., T]:
        signature = inspect.signature(method)

        @functools.wraps(method)
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> T:
            journal: SessionJournal | None = self.journal
            if journal is None:
                return method(self, *args, **kwargs)
            top = journal.depth == 0
            mode = current_grad_mode()
            with _Nesting(journal), numerics.record() if top else nullcontext(None) as ran:
                out = method(self, *args, **kwargs)
            if top:
                bound = signature.bind(self, *args, **kwargs)
                bound.apply_defaults()
                arguments = dict(bound.arguments)
                arguments.pop("self")
                journal.record(target, method.__name__, arguments, out, ran, mode)
            return out

        return wrapper

    return decorate


class _Nesting:
    """Inside a recorded call: the calls it makes are part of it (not recorded again)."""

    def __init__(self, journal: SessionJournal) -> None:
        self.journal = journal

    def __enter__(self) -> None:
        self.journal.depth += 1

    def __exit__(self, *exc: object) -> None:
        self.journal.depth -= 1
