"""`RingBackend`: a `StreamSession`'s denoiser backend whose DiT runs as a ring of ranks, one GPU each.

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

import functools
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

import torch

from wanstream.engine.denoise.base import Finished
from wanstream.engine.denoise.local import DeviceSteps
from wanstream.engine.errors import SessionError
from wanstream.engine.rng import SeededNoise
from wanstream.engine.settings import RING_CONDITIONING_PROBLEM, RING_LORA_PROBLEM, StreamSettings
from wanstream.parallel.ring import RingError
from wanstream.parallel.schedule import RingSchedule
from wanstream.parallel.stage import Lane, cache_config

if TYPE_CHECKING:
    from wanstream.parallel.host import RingHost


def _locked(method: Callable[..., Any]) -> Callable[..., Any]:
    """One ring operation at a time per process (a server runs sessions on worker threads)."""

    @functools.wraps(method)
    def wrapper(self: RingDenoiser, *args: Any, **kwargs: Any) -> Any:
        with self.ring.lock:
            return method(self, *args, **kwargs)

    return wrapper


def settings_problem(settings: StreamSettings) -> str | None:
    """Why a ring cannot run `settings`, or None."""
    if settings.batching != "stream" and len(settings.denoising_steps) > 1:
        return (
            "a multi-GPU ring runs stream batch (the steps of consecutive chunks as lanes); "
            "batching 'none' with several steps is single-GPU only"
        )
    if settings.loras:
        return RING_LORA_PROBLEM
    return None


class RingBackend:
    """A session's chunks denoised by a `Ring` (create the session with `ring.session(...)`)."""

    conditioner_problem = RING_CONDITIONING_PROBLEM

    def __init__(self, ring: RingHost) -> None:
        self.ring = ring
        self._sent_prompt: int | None = None  # the prompt version whose text K/V the ring has
        self._ring_version = 0

    def problem(self, settings: StreamSettings) -> str | None:
        return settings_problem(settings)

    def build(self, settings: StreamSettings, rng: Any, previous: RingDenoiser | None) -> RingDenoiser:
        if not isinstance(rng, SeededNoise):
            raise SessionError("a ring draws its noise from the seed (every rank draws its share)")
        if previous is not None:
            previous.quiesce()
        self.ring.configure(settings.model_copy(update={"batching": "stream"}))
        return RingDenoiser(self.ring, settings, rng)

    def condition(self, denoiser: RingDenoiser, embedding: torch.Tensor, version: int) -> int:
        """The ring's version of the conditioning in force (a new one travels with the next batch)."""
        if self._sent_prompt != version:
            self._ring_version = self.ring.next_version()
            context = self.ring.components.dit.embed_text(embedding)
            denoiser.add_context(self._ring_version, context)
            self._sent_prompt = version
        return self._ring_version

    def forget_conditioning(self) -> None:
        self._sent_prompt = None  # the next chunk sends its conditioning under a fresh ring version


class RingDenoiser:
    """Rank 0's side of the ring for one stream (a `ChunkDenoiser`)."""

    def __init__(self, ring: RingHost, settings: StreamSettings, rng: SeededNoise) -> None:
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
        self.due: deque[int] = deque()  # the chunks whose frames are still to come, in order
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
        self.due.clear()
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
    def timing(self, name: str) -> AbstractContextManager[Any]:
        if name == "encode":
            return self.ring.clock.before_batch("encode")  # rank 0's share, for the rebalancer
        return nullcontext()

    def weights_changed(self) -> None:
        pass  # LoRAs are refused (`settings_problem`): a ring's weights never change in place

    def state(self) -> dict[str, Any]:
        raise SessionError("snapshots are not available on a multi-GPU ring (its state is spread over ranks)")

    def load_state(self, state: dict[str, Any]) -> None:
        raise SessionError("snapshots are not available on a multi-GPU ring (its state is spread over ranks)")

    def close(self) -> None:
        pass  # the ranks keep their buffers for the next session, which reconfigures them

    # ----------------------------------------------------------------------------------------------
    @_locked
    def first_chunk(
        self, noisy: torch.Tensor, start: int, version: int, *, chunk: int, extension: None = None
    ) -> list[Finished]:
        """The stream's first chunk: its N steps one after the other, one trip around the ring each; its
        frames come back at once."""
        self._check()
        if extension is not None:
            raise SessionError(RingBackend.conditioner_problem)
        frames = noisy.shape[1]
        lanes = self.schedule.first_chunk(chunk, start, frames, self.rng.seed, version)
        self.due.append(chunk)
        x = noisy
        for i, lane in enumerate(lanes):
            last = i == len(lanes) - 1
            seq = self._send([lane], x, [self.steps[i]], frames, first=True, reset=i == 0, broadcast=last)
            x = self._await_return(seq)
        return [self._wait()]

    @_locked
    def chunk(
        self,
        noisy: torch.Tensor,
        start: int,
        first_step: int | torch.Tensor | None,
        version: int,
        *,
        chunk: int,
        extension: None = None,
        decode: bool,
    ) -> list[Finished]:
        """Send chunk `chunk` into the ring (batch m = its index in the stream); returns the chunks whose
        frames have arrived (never waits for them)."""
        self._check()
        if extension is not None:
            raise SessionError(RingBackend.conditioner_problem)
        m = self.schedule.call(chunk, start, first_step, self.rng.seed, version, decode)
        if decode:
            self.due.append(chunk)
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
        self._pump(None)
        done = [Finished(k, frames=frames) for k, frames in self.frames]
        self.frames.clear()
        return done

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
                due = self.due.popleft() if self.due else None
                if header["chunk"] != due:
                    raise self.ring.fail(
                        f"ring order error: frames of chunk {header['chunk']} arrived, {due} was due"
                    )
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
    def wait(self) -> Finished:
        """The next decoded chunk (waits for it; one must be on its way)."""
        return self._wait()

    def _wait(self) -> Finished:
        if not self.frames and self.expected_frames <= 0:
            raise RingError("waiting for frames that no batch will produce (ring schedule error)")
        self._pump(lambda: bool(self.frames))
        chunk, frames = self.frames.popleft()
        return Finished(chunk, frames=frames)

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
