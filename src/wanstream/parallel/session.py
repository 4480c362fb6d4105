"""`ParallelSession`: a `StreamSession` whose DiT runs as a ring of ranks, one GPU each.

Everything a session does on its own (input frames, the noise controller, prompts and transitions,
events, settings) runs unchanged on rank 0; only the denoising differs: `RingDenoiser` sends each chunk
into the ring and the last rank decodes the finished chunks and sends their frames back. Output comes
out in the same order with the same values as the single-process stream batch (exactly, on a CPU in
float32), later: a chunk's frames arrive about N·R chunks after its input instead of N − 1
(N steps, R ranks). `push()` returns whatever has arrived; `flush()` waits for the rest.

Prompt changes travel with the batches: a new conditioning's embedded text is attached to the next
batch and every rank keeps it (with its text K/V) under a version number that the lanes refer to.
"""

from __future__ import annotations

import copy
import functools
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, ExitStack, nullcontext
from typing import TYPE_CHECKING, Any

import torch

from wanstream.engine.batching import DeviceSteps
from wanstream.engine.codecs import Codecs
from wanstream.engine.noise import NoiseController
from wanstream.engine.prompts import WeightedPrompt
from wanstream.engine.rng import SeededNoise
from wanstream.engine.session import (
    ChunkConditioner,
    ChunkEvent,
    ChunkKind,
    OutputFormat,
    SessionError,
    StreamSession,
    _Pending,
)
from wanstream.engine.settings import RING_CONDITIONING_PROBLEM, SettingsUpdate, StreamSettings
from wanstream.parallel.ring import RingError
from wanstream.parallel.schedule import RingSchedule
from wanstream.parallel.stage import Lane, cache_config

if TYPE_CHECKING:
    from wanstream.parallel.launch import Ring


def _locked(method: Callable[..., Any]) -> Callable[..., Any]:
    """One ring operation at a time per process (a server runs sessions on worker threads)."""

    @functools.wraps(method)
    def wrapper(self: RingDenoiser, *args: Any, **kwargs: Any) -> Any:
        with self.ring.lock:
            return method(self, *args, **kwargs)

    return wrapper


def check_settings(settings: StreamSettings) -> None:
    """What a ring can run (raises SessionError with the reason)."""
    if settings.batching != "stream" and len(settings.denoising_steps) > 1:
        raise SessionError(
            "a multi-GPU ring runs stream batch (the steps of consecutive chunks as lanes); "
            "batching 'none' with several steps is single-GPU only"
        )
    if settings.loras:
        raise SessionError(
            "LoRAs are not supported on a multi-GPU ring yet (they change every rank's blocks)"
        )


class RingDenoiser:
    """Rank 0's side of the ring for one stream: what `Denoiser` is to a single-process session."""

    batching = "stream"
    cache_context = "last_step"
    graphs = None

    def __init__(self, ring: Ring, settings: StreamSettings, rng: SeededNoise) -> None:
        self.ring, self.link, self.stage = ring, ring.link, ring.stage
        self.settings = settings
        self.steps = list(settings.denoising_steps)
        self.rng = rng
        self.closed = False
        self._new_schedule()
        self.seq = 0  # batches sent (ring-wide message order)
        self.outstanding: set[int] = set()  # batches whose lanes have not come back yet
        self.returns: dict[int, torch.Tensor] = {}
        self.batch_seq: dict[int, int] = {}  # ring batch m → its message seq
        self.frames: deque[tuple[int, torch.Tensor]] = deque()  # (chunk, decoded frames) in order
        self.expected_frames = 0
        self.contexts: list[tuple[int, torch.Tensor]] = []  # new conditionings for the next batch
        self._timesteps = DeviceSteps()
        ring.claim(self)

    def _new_schedule(self) -> None:
        cfg = self.ring.components.dit.config
        cache = cache_config(self.settings, 0, cfg.num_heads, cfg.head_dim)
        self.schedule = RingSchedule(self.ring.world, self.steps, cache)

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    @property
    def lag(self) -> int:
        """Chunks between a chunk's input and its output (the single-process engine: N − 1)."""
        return self.schedule.lag

    # ----------------------------------------------------------------------------------------------
    @_locked
    def reset(self, steps: Sequence[int] | None = None) -> None:
        """Forget the stream: what is in flight finishes and is dropped; the next chunk starts a stream."""
        self.quiesce()
        self.frames.clear()
        self.returns.clear()
        self.batch_seq.clear()
        if steps is not None:
            if len(steps) != self.num_steps:
                raise SessionError("a different number of steps needs a rebuild (the lanes change)")
            self.steps = list(steps)
        self._new_schedule()

    def retarget(self, steps: Sequence[int]) -> None:
        if len(steps) != self.num_steps:
            raise ValueError("retarget keeps the number of steps; a different count needs reset()")
        self.steps = list(steps)
        self.schedule.retarget(self.steps)

    def add_context(self, version: int, context: torch.Tensor) -> None:
        self.stage.add_context(version, context)
        self.contexts.append((version, context))

    # ----------------------------------------------------------------------------------------------
    @_locked
    def first_chunk(self, noisy: torch.Tensor, start: int, version: int, chunk: int) -> None:
        """The stream's first chunk: its N steps one after the other, one trip around the ring each."""
        self._check()
        frames = noisy.shape[1]
        lanes = self.schedule.first_chunk(chunk, start, frames, self.rng.seed, version)
        x = noisy
        for i, lane in enumerate(lanes):
            last = i == len(lanes) - 1
            seq = self._send([lane], x, [self.steps[i]], frames, first=True, reset=i == 0, broadcast=last)
            x = self._await_return(seq)

    @_locked
    def chunk(
        self,
        noisy: torch.Tensor,
        start: int,
        first_step: int | torch.Tensor | None,
        version: int,
        chunk: int,
        decode: bool,
    ) -> None:
        """Send chunk `chunk` into the ring (batch m = its index in the stream)."""
        self._check()
        m = self.schedule.call(chunk, start, first_step, self.rng.seed, version, decode)
        plan = self.schedule.batch(m)
        R = self.ring.world
        returned = self._await_return(self.batch_seq.pop(m - R)) if m - R >= 1 else None
        zeros = torch.zeros_like(noisy)
        parts = []
        for j, source in enumerate(plan.sources):
            if source == "noisy":
                parts.append(noisy)
            elif source == "return":
                assert returned is not None
                parts.append(returned[j - 1 : j])
            else:
                parts.append(zeros)
        x = torch.cat(parts)
        self.batch_seq[m] = self._send(
            plan.lanes, x, plan.timesteps, 1, steady=all(lane.live for lane in plan.lanes)
        )
        ring = self.ring
        if ring.rebalance_after and not ring.rebalanced and len(ring.clock.batches) >= ring.rebalance_after:
            ring.rebalance()  # once: drains what is in flight, moves blocks, the stream goes on

    def _send(
        self,
        lanes: list[Lane],
        x: torch.Tensor,
        timesteps: Sequence[int | torch.Tensor],
        frames: int,
        *,
        first: bool = False,
        reset: bool = False,
        broadcast: bool = False,
        steady: bool = False,
    ) -> int:
        B = x.shape[0]
        t = self._timesteps(timesteps, self.steps, x.device)[:, None].expand(B, frames).contiguous()
        if reset:
            self.stage.reset()
        clock = self.ring.clock
        with clock.batch(steady and not first), clock("dit"):
            tokens, e, e0 = self.stage.embed(x, t)
            h = self.stage.blocks(tokens, e0, lanes, frames)
        if broadcast:
            self.stage.cache.broadcast_lane0()  # type: ignore[union-attr]
        seq, self.seq = self.seq, self.seq + 1
        contexts, self.contexts = self.contexts, []
        header = {
            "kind": "batch",
            "seq": seq,
            "frames": frames,
            "lanes": [lane.to_json() for lane in lanes],
            "contexts": [v for v, _ in contexts],
            "first": first,
            "reset": reset,
            "broadcast": broadcast,
        }
        with self._guarded():
            self.link.send(1, header, [*(c for _, c in contexts), x, t, h, e0, e])
        self.outstanding.add(seq)
        self.expected_frames += sum(lane.decode for lane in lanes)
        return seq

    # ----------------------------------------------------------------------------------------------
    # What comes back from the last rank, in its send order: lanes ("return"), then frames
    # ----------------------------------------------------------------------------------------------
    def _pump(self, until: Callable[[], bool] | None) -> None:
        """Read the last rank's messages: until `until()` holds, or (None) only what has arrived."""
        last, box = self.ring.world - 1, self.link.mailbox
        while until is None or not until():
            with self._guarded():
                if until is None:
                    header = box.poll(last)
                    if header is None:
                        return
                else:
                    header = box.take(last, self._timeout(), "the ring's output")
                kind = header["kind"]
                tensors = self.link.recv_tensors(last, header, f"{kind} message", host_wait=kind == "frames")
            if kind == "return":
                self.outstanding.discard(header["seq"])
                self.returns[header["seq"]] = tensors[0]
            elif kind == "frames":
                self.expected_frames -= 1
                self.frames.append((header["chunk"], tensors[0]))
            else:
                raise self.ring.fail(f"ring protocol error: unexpected {kind!r} message from the last rank")

    def _timeout(self) -> float:
        """The first batches of a stream meet new shapes (compiled ranks compile them): a long wait."""
        warm = self.num_steps * self.ring.world + self.settings.kv_cache_frames + 2
        return self.ring.warmup_timeout_s if self.seq < self.num_steps + warm else self.link.timeout

    def _await_return(self, seq: int) -> torch.Tensor:
        self._pump(lambda: seq in self.returns)
        return self.returns.pop(seq)

    @_locked
    def poll_frames(self) -> list[tuple[int, torch.Tensor]]:
        """Decoded chunks that have arrived (never waits)."""
        self._pump(None)
        out = list(self.frames)
        self.frames.clear()
        return out

    @_locked
    def wait_frames(self) -> tuple[int, torch.Tensor]:
        """The next decoded chunk (waits for it; one must be on its way)."""
        if not self.frames and self.expected_frames <= 0:
            raise RingError("waiting for frames that no batch will produce (ring schedule error)")
        self._pump(lambda: bool(self.frames))
        return self.frames.popleft()

    @_locked
    def quiesce(self) -> None:
        """Wait until nothing is in flight (frames that arrive are kept)."""
        if self.ring.broken is not None:
            return
        self._pump(lambda: not self.outstanding and self.expected_frames <= 0)

    def _check(self) -> None:
        if self.closed:
            raise SessionError("this session's ring now serves a newer session")
        self.ring.ensure_ok()

    def _guarded(self) -> AbstractContextManager[None]:
        return self.ring.guarded()


class ParallelSession(StreamSession):
    """A stream on a `Ring` (create it with `ring.session(...)`); the `StreamSession` API."""

    denoiser: RingDenoiser  # type: ignore[assignment]

    def __init__(
        self,
        ring: Ring,
        settings: StreamSettings | None = None,
        *,
        prompts: Sequence[WeightedPrompt | str] | None = None,
        output: OutputFormat = "uint8",
        event_log_size: int = 2048,
    ) -> None:
        self.ring = ring
        self._sent_prompt: int | None = None  # the prompt version whose text K/V the ring has
        self._ring_version = 0
        super().__init__(
            ring.components, settings, prompts=prompts, output=output, event_log_size=event_log_size
        )

    # ----------------------------------------------------------------------------------------------
    def _build(self, settings: StreamSettings | None = None) -> None:
        s, c = settings or self.settings, self.components
        check_settings(s)
        codecs = Codecs.create(c, s)  # rank 0 encodes; its decoder object is unused (the last rank decodes)
        old: RingDenoiser | None = getattr(self, "denoiser", None)
        if old is not None:
            old.quiesce()
        self.ring.configure(s.model_copy(update={"batching": "stream"}))
        rng = SeededNoise(s.seed)
        denoiser = RingDenoiser(self.ring, s, rng)
        self.settings = s
        self.rng, self.denoiser, self.codecs = rng, denoiser, codecs
        self.controller = NoiseController(s.noise_scale, s.noise_controller)
        self._pending = _Pending(first_index=self.frames_in)
        self._in_flight: deque[ChunkEvent] = deque()
        self._restart_stream()

    def update(self, update: SettingsUpdate | dict[str, Any]) -> torch.Tensor:
        """`StreamSession.update`, refusing what a ring cannot run before anything changes."""
        if isinstance(update, dict):
            update = SettingsUpdate.model_validate(update)
        check_settings(self.settings.updated(update))
        return super().update(update)

    def _check_loras(self, settings: StreamSettings) -> None:
        check_settings(settings)

    def attach(self, conditioner: ChunkConditioner | None) -> None:
        if conditioner is not None:
            raise SessionError(RING_CONDITIONING_PROBLEM)

    def snapshot(self) -> dict[str, Any]:
        raise SessionError("snapshots are not available on a multi-GPU ring (its state is spread over ranks)")

    def restore(self, snap: dict[str, Any]) -> None:
        raise SessionError("snapshots are not available on a multi-GPU ring (its state is spread over ranks)")

    def _stage(self, name: str) -> AbstractContextManager[Any]:
        stack = ExitStack()
        if name == "encode":
            stack.enter_context(self.ring.clock.before_batch("encode"))  # rank 0's share, for the rebalancer
        stack.enter_context(self.stage_timer(name) if self.stage_timer is not None else nullcontext())
        return stack

    # ----------------------------------------------------------------------------------------------
    def _conditioning(self) -> int:
        """The ring's version of the conditioning in force (a new one travels with the next batch)."""
        if self.prompt.embedding is None:
            raise SessionError("no prompt set: call set_prompts() first")
        if self._sent_prompt != self.prompt.version:
            self._ring_version = self.ring.next_version()
            context = self.components.dit.embed_text(self.prompt.embedding)
            self.denoiser.add_context(self._ring_version, context)
            self._sent_prompt = self.prompt.version
        return self._ring_version

    def _denoise_and_decode(
        self,
        noisy: torch.Tensor,
        kind: ChunkKind,
        span: tuple[int, int],
        noise_scale: torch.Tensor | None,
        first_step: torch.Tensor | None,
    ) -> torch.Tensor:
        self.prompt.advance()  # one transition step per chunk (a no-op otherwise)
        version = self._conditioning()
        L = self.settings.frame_tokens
        event = self._open_event(noisy.shape[1], kind, span, noise_scale, first_step)
        k, position = event.chunk, event.position
        self._in_flight.append(event)
        if self._stream_chunks == 0:
            self.denoiser.first_chunk(noisy, position * L, version, chunk=k)
            self._stream_chunks += 1
            return self._concat([self._emit(*self.denoiser.wait_frames())])  # the first frames at once
        self.denoiser.chunk(noisy, position * L, first_step, version, chunk=k, decode=kind != "flush")
        self._stream_chunks += 1
        return self._concat([self._emit(chunk, frames) for chunk, frames in self.denoiser.poll_frames()])

    def _emit(self, chunk: int, frames: torch.Tensor) -> torch.Tensor:
        """Frames [1, T, 3, H, W] decoded by the last rank → the output of the oldest chunk in flight."""
        event = self._in_flight.popleft()
        if event.chunk != chunk:
            raise self.ring.fail(
                f"ring order error: frames of chunk {chunk} arrived, chunk {event.chunk} was due"
            )
        if event.trim:
            frames = frames[:, : frames.shape[1] - event.trim]
        out = self._format(frames[0])
        event.output_frames = (self.frames_out, self.frames_out + out.shape[0])
        self.frames_out += out.shape[0]
        return out

    def _drain_lanes(self) -> torch.Tensor:
        """End of input (or a draining cut): every real chunk in flight comes out."""
        if self._stream_chunks == 0:
            return self._empty_output()
        real = sum(e.kind != "flush" for e in self._in_flight)
        # One process runs N − 1 flush chunks when something is in flight (its prompt state and chunk
        # counter advance by that much); the ring needs (N − 1)·R of them.
        single = self.denoiser.num_steps - 1 if real else 0
        return self._finish(real, single)

    def reset(self, *, drain: bool = False) -> torch.Tensor:
        """Restart the stream (hard cut). Without `drain`, the chunks one process would have finished by
        now still come out (the ring holds more chunks in flight, not different ones); the rest are
        dropped, as in one process."""
        if drain:
            out = self._drain_lanes()
        else:
            real = sum(e.kind != "flush" for e in self._in_flight)
            held = min(
                self.denoiser.num_steps - 1, max(self._stream_chunks - 1, 0)
            )  # in flight in one process
            out = self._finish(real - held, 0)
        self._restart_stream()
        return out

    def _finish(self, due: int, single_flush: int) -> torch.Tensor:
        """Emit the oldest `due` real chunks in flight, running flush chunks (pure noise, output dropped)
        until they are through; then leave the prompt state and chunk counter as one process leaves them
        after `single_flush` flush chunks."""
        if due <= 0:
            return self._empty_output()
        real_left = sum(e.kind != "flush" for e in self._in_flight) - due
        flush = max(0, self.denoiser.lag - real_left)  # the last due chunk needs `lag` chunks behind it
        saved = None
        outputs = []
        for i in range(flush):
            if i == single_flush:
                saved = (copy.deepcopy(self.prompt.__dict__), self._chunk_counter)
            c, s = self.components, self.settings
            shape = (1, 1, c.dit.config.in_dim, s.height // 8, s.width // 8)
            noisy = self.rng.randn(shape, chunk=self._chunk_counter, draw=0, device=c.device, dtype=c.dtype)
            outputs.append(
                self._denoise_and_decode(noisy, "flush", (self.frames_in, self.frames_in), None, None)
            )
        if saved is None:
            saved = (copy.deepcopy(self.prompt.__dict__), self._chunk_counter)
        while sum(e.kind != "flush" for e in self._in_flight) > real_left:
            outputs.append(self._emit(*self.denoiser.wait_frames()))
        self.prompt.__dict__.update(saved[0])
        self._chunk_counter = saved[1]
        self._sent_prompt = None  # the restored prompt state gets a fresh ring version
        return self._concat(outputs)
