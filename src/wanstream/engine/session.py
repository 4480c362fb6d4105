"""`StreamSession`: frames in, stylised frames out, chunk by chunk, with live control.

A session owns every piece of per-stream state: the denoiser (its backend builds it: the DiT's KV cache
and lanes in this process, `engine.denoise.local`, or a ring of processes, `wanstream.parallel`), the
encoder/decoder streaming caches, the noise controller, the prompt state, pending input frames and the
positions. Models are shared and stateless.

Chunks: the first chunk of a stream is 5 frames → 2 latents → 5 output frames; every later chunk is
4 frames → 1 latent → 4 frames. In stream batch a chunk's frames come out N−1 chunks later; `flush()`
drains them at the end of input (padding a last partial chunk with its last frame and trimming the
output, so a clip of T frames gives exactly T frames).

Positions: chunk 0 occupies latent frames [0, 2), chunk k ≥ 1 frame k+1. When the next chunk's frame
index reaches `rope_reset_frame` (StreamDiffusionV2's t_refresh, 50), it restarts at the cache's last
frame (kv_cache_frames − 1) and grows again — positions stay bounded, so a session runs forever.
"""

from __future__ import annotations

import copy
import functools
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F

from wanstream.engine.codecs import Codecs
from wanstream.engine.components import Components
from wanstream.engine.denoise.base import ChunkDenoiser, DenoiserBackend, Finished
from wanstream.engine.denoise.local import LocalBackend
from wanstream.engine.errors import SessionError
from wanstream.engine.frames import FrameInput, as_frames
from wanstream.engine.journal import SessionJournal, current_grad_mode, recorded
from wanstream.engine.lora import lora_manager
from wanstream.engine.memory import out_of_memory_message, release_device_memory
from wanstream.engine.noise import NoiseController
from wanstream.engine.prompts import (
    EmbeddingCache,
    PromptChange,
    PromptState,
    Transition,
    WeightedPrompt,
    blend,
)
from wanstream.engine.rng import NoiseSource, SeededNoise
from wanstream.engine.settings import (
    LORA_FIELDS,
    REBUILD_FIELDS,
    PromptSwitch,
    SettingsUpdate,
    StreamSettings,
    conditioning_problem,
    text_mode_problem,
)
from wanstream.models.dit import StreamExtension
from wanstream.models.fastpath import COMPILES, GATE

OutputFormat = Literal["uint8", "float"]
ChunkKind = Literal["input", "flush", "text"]  # made from input frames, by a flush, or from prompts alone


@dataclass
class ChunkEvent:
    """One chunk's story, for tests, stats and the CLI. Device values are resolved when read."""

    chunk: int
    kind: ChunkKind
    input_frames: tuple[int, int]  # [start, end) of input frames (empty for flush/text chunks)
    prompt: tuple[tuple[str, float], ...]
    transition_left: int
    stream_start: bool  # the first chunk after a (re)start: 5 frames, 2 latents
    position: int  # RoPE frame index of the chunk's first latent
    _steps: list[int | torch.Tensor]
    _noise_scale: torch.Tensor | float | None
    trim: int = 0  # padding frames at the end of this chunk's input (cut from its output)
    output_frames: tuple[int, int] | None = None  # [start, end) of output frames, once decoded
    loras: tuple[tuple[str, float, str], ...] = ()  # (path, scale, mode) of the LoRAs this chunk ran with

    @property
    def timesteps(self) -> list[int]:
        return [int(t) for t in self._steps]

    @property
    def noise_scale(self) -> float | None:
        return None if self._noise_scale is None else float(self._noise_scale)


@dataclass
class _Pending:
    frames: list[torch.Tensor] = field(default_factory=list)  # [3, H, W] in [-1, 1], model resolution
    first_index: int = 0  # input index of frames[0]


class ChunkConditioner(Protocol):
    """Extra per-chunk conditioning (e.g. VACE control video), chunked like the main input.

    The session asks for the DiT extension of each chunk it denoises (`None`: unconditioned) and resets
    the conditioner whenever the stream restarts.
    """

    def extension_for(self, event: ChunkEvent) -> StreamExtension | None: ...

    def reset(self) -> None: ...


class StreamOutOfMemory(SessionError):
    """The device ran out of memory mid-stream: this session is closed and its memory released."""


def _gpu_work(method: Callable[..., Any]) -> Callable[..., Any]:
    """Marks a public call that runs chunks on the device.

    * Another thread's CUDA-graph capture waits for it to end (and it waits for that capture), so the capture
      never sees this thread's work (models.fastpath).
    * Out of memory ends this session only: it is closed, its memory released, and `StreamOutOfMemory` says
      how much was asked for and what to lower. (Its state is half-way through a chunk: it cannot go on.)
    """

    @functools.wraps(method)
    def wrapper(self: StreamSession, *args: Any, **kwargs: Any) -> Any:
        if self.closed is not None:
            raise SessionError(f"this session is closed ({self.closed}); start a new one")
        with GATE.work(), self._own_mode():
            try:
                return method(self, *args, **kwargs)
            except torch.OutOfMemoryError as exc:
                text = str(exc)
            # Outside the handler: the traceback (and the tensors its frames hold) is gone.
            message = self._close_after_oom(text)
        raise StreamOutOfMemory(message)

    return wrapper


def _in_its_mode(method: Callable[..., Any]) -> Callable[..., Any]:
    """Marks a public call that updates the session's tensors: it runs in inference mode when the session was
    made in it (`StreamSession._own_mode`). `_gpu_work` calls do so too."""

    @functools.wraps(method)
    def wrapper(self: StreamSession, *args: Any, **kwargs: Any) -> Any:
        with self._own_mode():
            return method(self, *args, **kwargs)

    return wrapper


class StreamSession:
    def __init__(
        self,
        components: Components,
        settings: StreamSettings | None = None,
        *,
        prompts: Sequence[WeightedPrompt | str] | WeightedPrompt | str | None = None,
        noise: NoiseSource | None = None,
        output: OutputFormat = "uint8",
        event_log_size: int = 2048,
        backend: DenoiserBackend | None = None,
        log: bool | SessionJournal = False,
    ) -> None:
        """`backend` denoises the chunks: this process by default (`LocalBackend`), or a ring of them.
        `log`: keep a journal of every change and input frame from here on (`log()`; `wanstream.takes`
        saves and replays it) — True keeps its frames in memory; a `SessionJournal` brings its own store."""
        self.components = components
        # Made in inference mode, its buffers are inference tensors, which torch refuses to update in place
        # outside it: a session made inside `torch.inference_mode()` and pushed outside failed mid-chunk.
        self._made_in_inference = torch.is_inference_mode_enabled()
        self.journal: SessionJournal | None = None
        if log:
            self.journal = (
                log
                if isinstance(log, SessionJournal)
                else SessionJournal(
                    settings=(settings or StreamSettings()).model_dump(mode="json"), output=output
                )
            )
            if noise is not None:
                self.journal.mark_unreplayable(f"a custom noise source ({type(noise).__name__})")
            self.journal.grad_mode = current_grad_mode()
        self.backend: DenoiserBackend = backend or LocalBackend(components)
        self.closed: str | None = None  # why, once close() ran
        self.settings = settings or StreamSettings()
        self.output = output
        self.events: deque[ChunkEvent] = deque(maxlen=event_log_size)
        self._noise_override = noise
        self._prompt_cache = (
            EmbeddingCache(self._encode_texts) if components.text_encoder is not None else None
        )
        self.prompt = PromptState()
        self._lora_seen = (-1, -1)  # the LoRA manager's (version, structure) this stream last ran with
        self.frames_in = 0
        self.frames_out = 0
        self._trim_next = 0  # padding frames in the chunk being flushed (trimmed from its output)
        self._chunk_counter = 0  # monotonic: keys the noise of every chunk ever processed
        self._live_change_chunks = 0  # chunks left whose new shapes compile in the background (a live change)
        self.conditioner: ChunkConditioner | None = None
        # Optional instrumentation (the benchmark's CUDA-event timer): stage name → context manager.
        self.stage_timer: Callable[[str], AbstractContextManager[Any]] | None = None
        self._build()
        if prompts is not None:
            self.set_prompts(prompts)

    def _own_mode(self) -> AbstractContextManager[Any]:
        """Inference mode for a session made in it (whatever the caller's mode), else the caller's mode."""
        if self._made_in_inference and not torch.is_inference_mode_enabled():
            return torch.inference_mode()
        return nullcontext()

    # ----------------------------------------------------------------------------------------------
    # Construction and reset
    # ----------------------------------------------------------------------------------------------
    def _build(self, settings: StreamSettings | None = None) -> None:
        """(Re)create the per-stream machinery for `settings`. Everything that can fail (a missing
        autoencoder, out of memory) happens before anything is replaced, so a failed rebuild leaves the
        session as it was."""
        s = settings or self.settings
        self._check_settings(s)
        codecs = Codecs.create(self.components, s)
        rng: NoiseSource = self._noise_override or SeededNoise(s.seed)
        previous: ChunkDenoiser | None = getattr(self, "denoiser", None)  # None while __init__ builds
        denoiser = self.backend.build(s, rng, previous)
        # Nothing above touched the session: install.
        self.settings = s
        self.rng, self.denoiser, self.codecs = rng, denoiser, codecs
        self.controller = NoiseController(s.noise_scale, s.noise_controller)
        self._pending = _Pending(first_index=self.frames_in)
        self._restart_stream()

    def _restart_stream(self) -> None:
        """Forget the stream's past (caches, positions, motion history); keep prompts and pending input."""
        self.denoiser.reset(list(self.settings.denoising_steps))
        self.codecs.reset()
        self.controller.reset()
        if self.conditioner is not None:
            self.conditioner.reset()
        self._stream_chunks = 0  # chunks since the stream (re)started
        self._next_position = 0  # latent frame index of the next chunk
        self._in_flight: deque[ChunkEvent] = deque()  # stream batch: chunks inside the lanes

    @_gpu_work
    @recorded("session")
    def reset(self, *, drain: bool = False) -> torch.Tensor:
        """Restart the stream (hard cut). With `drain`, chunks still inside the lanes come out first.

        Without it, the chunks that stream batch in one process would have finished by now still come out
        (a ring holds more chunks in flight, not different ones); the rest are dropped."""
        if drain:
            out = self._drain_lanes()
        else:
            held = min(self._lanes_lag, max(self._stream_chunks - 1, 0))  # in flight in one process
            out = self._finish(self._real_in_flight - held, 0)
        self._restart_stream()
        return out

    # ----------------------------------------------------------------------------------------------
    # Live control
    # ----------------------------------------------------------------------------------------------
    @_gpu_work
    @recorded("session")
    def update(self, update: SettingsUpdate | dict[str, Any]) -> torch.Tensor:
        """Apply a validated change; a rejected one raises and leaves the session as it was.

        Most fields apply from the next chunk. Fields in `REBUILD_FIELDS`, and a different number of
        steps, restart the stream: chunks still in flight come out first (returned here, in the old
        settings) and pending input frames carry over.
        """
        if isinstance(update, dict):
            update = SettingsUpdate.model_validate(update)
        new = self.settings.updated(update)
        if problem := self.backend.problem(new):
            raise SessionError(problem)
        changed = {k for k in update.model_fields_set if getattr(new, k) != getattr(self.settings, k)}
        if not changed:
            return self._empty_output()
        if problem := text_mode_problem(new.mode, has_prompts=self.prompt.embedding is not None):
            raise SessionError(f"{problem}: set them before switching")
        if self.conditioner is not None and (problem := conditioning_problem(new.batching)):
            raise SessionError(problem)
        old = self.settings
        steps_count_changed = len(new.denoising_steps) != len(old.denoising_steps)
        restart = bool(changed & REBUILD_FIELDS) or steps_count_changed
        # New LoRAs apply from the next chunk; with lora_switch 'cut' the stream restarts for them.
        lora_cut = bool(changed & LORA_FIELDS) and new.lora_switch == "cut"
        if changed & LORA_FIELDS:
            self._check_settings(new)  # a missing or malformed file raises here, before anything changes
        if restart:
            Codecs.create(self.components, new)  # fails early (missing autoencoder) before any drain
        drained = self._drain_lanes() if restart or lora_cut else self._empty_output()
        if restart:
            pending = self._pending
            self._build(new)
            self._pending = pending
            # The new shapes (lanes, frame size, cache phases) meet the compiled code over the next chunks:
            # compile them on a helper thread while those chunks run eager code (fastpath.COMPILES).
            self._live_change_chunks = new.kv_cache_frames + len(new.denoising_steps) + 4
            if (new.height, new.width) != (old.height, old.width) and pending.frames:
                resized = F.interpolate(
                    torch.stack(pending.frames), size=(new.height, new.width), mode="bilinear", antialias=True
                )
                pending.frames = list(resized)
            return drained
        self.settings = new
        if "seed" in changed and self._noise_override is None:
            self.rng = SeededNoise(new.seed)
            self.denoiser.rng = self.rng
        if "steps" in changed:
            self.denoiser.retarget(new.denoising_steps)
        self.controller.initial = new.noise_scale
        self.controller.enabled = new.noise_controller
        if lora_cut:
            self._restart_stream()
        return drained

    @_in_its_mode
    @recorded("session")
    def attach(self, conditioner: ChunkConditioner | None) -> None:
        """Attach (or detach, with None) per-chunk conditioning such as VACE."""
        if conditioner is not None and self.backend.conditioner_problem is not None:
            raise SessionError(self.backend.conditioner_problem)
        if conditioner is not None and (problem := conditioning_problem(self.settings.batching)):
            raise SessionError(problem)
        self.conditioner = conditioner
        if conditioner is not None:
            conditioner.reset()

    @_in_its_mode
    @recorded("session")
    def set_prompts(
        self,
        prompts: Sequence[WeightedPrompt | str] | WeightedPrompt | str,
        *,
        transition: Transition | None = None,
        switch: PromptSwitch | None = None,
        drain: bool = False,
    ) -> torch.Tensor:
        """Change the conditioning. Without a transition, `switch` (default: the settings') decides between
        a hard cut (caches reset) and a cross-attention refresh (caches kept). Returns any frames a
        draining cut produced. `prompts`: one prompt (a string) or a weighted blend (a list)."""
        if isinstance(prompts, (str, WeightedPrompt)):
            prompts = [prompts]
        items = [p if isinstance(p, WeightedPrompt) else WeightedPrompt(text=p) for p in prompts]
        if not items:
            raise SessionError("at least one prompt is needed")
        if self._prompt_cache is None:
            raise SessionError("no text encoder loaded: give embeddings with set_prompt_embeddings()")
        embeds = self._prompt_cache.get_many([p.text for p in items])
        method = transition.method if transition is not None else "linear"
        target = blend(embeds, [p.weight for p in items], method)
        return self._apply_conditioning(items, target, transition, switch, drain)

    @_in_its_mode
    @recorded("session")
    def set_prompt_embeddings(
        self,
        embeddings: torch.Tensor,
        *,
        label: str = "<embeddings>",
        transition: Transition | None = None,
        switch: PromptSwitch | None = None,
        drain: bool = False,
    ) -> torch.Tensor:
        """Condition on precomputed text-encoder output [1, T, text_dim] (no text encoder needed)."""
        if embeddings.dim() != 3 or embeddings.shape[0] != 1:
            raise SessionError(f"embeddings must be [1, T, text_dim], got {tuple(embeddings.shape)}")
        target = embeddings.to(self.components.device, self.components.dtype)
        return self._apply_conditioning([WeightedPrompt(text=label)], target, transition, switch, drain)

    def _apply_conditioning(
        self,
        items: list[WeightedPrompt],
        target: torch.Tensor,
        transition: Transition | None,
        switch: PromptSwitch | None,
        drain: bool,
    ) -> torch.Tensor:
        change: PromptChange = self.prompt.set(items, target, transition)
        if change.kind == "refresh" and (switch or self.settings.prompt_switch) == "cut":
            return self.reset(drain=drain)
        return self._empty_output()

    def _encode_texts(self, texts: list[str]) -> torch.Tensor:
        enc = self.components.text_encoder
        assert enc is not None
        return enc.encode(texts).to(self.components.device, self.components.dtype)

    def _check_settings(self, settings: StreamSettings) -> None:
        """Refuse what the backend cannot run (SessionError); load and validate the LoRA files of `settings`
        (cached by the manager; LoraError)."""
        if problem := self.backend.problem(settings):
            raise SessionError(problem)
        if settings.loras:
            lora_manager(self.components).prepare(settings.loras, settings.lora_mode)

    @contextmanager
    def _loras_in_force(self) -> Iterator[None]:
        """This stream's LoRAs on the shared DiT for the whole chunk (other streams wait for the lock)."""
        manager = self.components.loras
        if manager is None and not self.settings.loras:
            yield
            return
        manager = lora_manager(self.components)
        with manager.lock:
            manager.apply(self.settings.loras, self.settings.lora_mode)
            version, structure = self._lora_seen
            if manager.structure != structure:
                self.denoiser.weights_changed()
            if manager.version != version:
                self.backend.forget_conditioning()  # text K/V are DiT projections; prompts stay encoded
            self._lora_seen = (manager.version, manager.structure)
            yield

    def _conditioning(self) -> Any:
        """The prompt in force, as the backend conditions the DiT on it (prepared once per version)."""
        if self.prompt.embedding is None:
            raise SessionError("no prompt set: call set_prompts() first")
        return self.backend.condition(self.denoiser, self.prompt.embedding, self.prompt.version)

    # ----------------------------------------------------------------------------------------------
    # Frames in, frames out
    # ----------------------------------------------------------------------------------------------
    @property
    def _needed(self) -> int:
        return 5 if self._stream_chunks == 0 else 4

    @property
    def chunk_frames(self) -> int:
        """Input frames the next chunk takes in all: 5 at a stream start (after creation, reset or a cut), else 4."""
        return self._needed

    @property
    def frames_needed(self) -> int:
        """Input frames still missing before `push` can run the next chunk (5 at a stream start, then 4)."""
        return max(self._needed - len(self._pending.frames), 0)

    @property
    def at_stream_start(self) -> bool:
        """True until the first chunk of the current stream has run (after creation, reset or a cut)."""
        return self._stream_chunks == 0

    @property
    def pending_frames(self) -> int:
        """Input frames buffered but not yet part of a chunk."""
        return len(self._pending.frames)

    @_gpu_work
    @recorded("session")
    def push(self, frames: FrameInput) -> torch.Tensor:
        """Feed input frames: [T, H, W, 3] uint8 (or float in [0, 1]) as a torch tensor or a numpy array,
        one [H, W, 3] frame, a PIL image, or a list of these; any size (resized to the stream's).

        Returns the output ready now: a torch.uint8 tensor [T, height, width, 3] (float [0, 1] when the
        session's `output` is "float") on the model's device — T is 0 until a chunk completes;
        `.cpu().numpy()` gives a numpy array."""
        if self.settings.mode != "video":
            raise SessionError("push() feeds input video; this session is in text mode (use generate())")
        frames = self._as_frames(frames)
        for frame in self._prepare_input(frames):
            self._pending.frames.append(frame)
        self.frames_in += frames.shape[0]
        outputs = []
        while len(self._pending.frames) >= self._needed:
            outputs.append(self._process_video_chunk(self._needed))
        return self._concat(outputs)

    @_gpu_work
    @recorded("session")
    def flush(self) -> torch.Tensor:
        """End of input: process the last partial chunk (padded, output trimmed) and drain the lanes."""
        outputs = []
        real = len(self._pending.frames)
        if real:
            pad = self._needed - real
            self._pending.frames.extend([self._pending.frames[-1]] * pad)
            self._trim_next = pad
            outputs.append(self._process_video_chunk(self._needed))
        outputs.append(self._drain_lanes())
        self._restart_stream()  # input ended: whatever comes next is a new stream
        return self._concat(outputs)

    @_gpu_work
    @recorded("session")
    def generate(self, chunks: int = 1) -> torch.Tensor:
        """Text mode: the next `chunks` chunks of video generated from the prompts alone."""
        if self.settings.mode != "text":
            raise SessionError("generate() is for text mode; this session restyles input video (use push())")
        outputs = [self._process_text_chunk() for _ in range(chunks)]
        return self._concat(outputs)

    @staticmethod
    def _as_frames(frames: FrameInput) -> torch.Tensor:
        try:
            return as_frames(frames)
        except (TypeError, ValueError) as exc:
            raise SessionError(str(exc)) from None

    def _prepare_input(self, frames: torch.Tensor) -> list[torch.Tensor]:
        c, s = self.components, self.settings
        x = frames.to(c.device, non_blocking=True)
        # uint8 → [-1, 1] exactly as the reference (u8 / 127.5 − 1).
        x = x.float() / 127.5 - 1.0 if x.dtype == torch.uint8 else x.float() * 2.0 - 1.0
        x = x.permute(0, 3, 1, 2)
        if tuple(x.shape[-2:]) != (s.height, s.width):
            x = F.interpolate(
                x, size=(s.height, s.width), mode="bilinear", align_corners=False, antialias=True
            )
        return list(x)

    def _take(self, n: int) -> tuple[torch.Tensor, tuple[int, int]]:
        frames = self._pending.frames[:n]
        del self._pending.frames[:n]
        first = self._pending.first_index
        real = n - self._trim_next
        self._pending.first_index += real
        return torch.stack(frames, dim=1)[None], (first, first + real)

    def _process_video_chunk(self, n: int) -> torch.Tensor:
        frames, span = self._take(n)  # [1, 3, n, H, W]
        c = self.components
        first = self._stream_chunks == 0
        noise = self.controller.first_chunk(frames) if first else self.controller.next_chunk(frames)
        self.controller.enabled = self.settings.noise_controller
        with self._stage("encode"):
            latents = self.codecs.encode(frames.to(c.dtype))  # [1, F, 16, h, w]
        k = self._chunk_counter
        eps = self.rng.randn(latents.shape, chunk=k, draw=0, device=latents.device, dtype=latents.dtype)
        # The reference mixes with Python floats: 1 − s is formed in float64, then cast.
        noisy = eps * noise.scale.to(latents.dtype) + latents * (1 - noise.scale).to(latents.dtype)
        return self._denoise_and_decode(
            noisy, "input", span, noise.scale, None if first else noise.first_step
        )

    def _process_text_chunk(self) -> torch.Tensor:
        c, s = self.components, self.settings
        F_lat = 2 if self._stream_chunks == 0 else 1
        shape = (1, F_lat, c.dit.config.in_dim, s.height // 8, s.width // 8)
        noisy = self.rng.randn(shape, chunk=self._chunk_counter, draw=0, device=c.device, dtype=c.dtype)
        return self._denoise_and_decode(noisy, "text", (self.frames_in, self.frames_in), None, None)

    def _position(self, frames: int) -> int:
        """The next chunk's first latent frame index, applying the periodic RoPE reset."""
        reset = self.settings.rope_reset_frame
        if reset is not None and self._stream_chunks > 0 and self._next_position >= reset:
            self._next_position = self.settings.kv_cache_frames - 1
        position = self._next_position
        self._next_position += frames
        return position

    def _denoise_and_decode(
        self,
        noisy: torch.Tensor,
        kind: ChunkKind,
        span: tuple[int, int],
        noise_scale: torch.Tensor | None,
        first_step: torch.Tensor | None,
    ) -> torch.Tensor:
        with self._loras_in_force(), COMPILES.live_change(self._live_change_chunks > 0):
            out = self._denoise_and_decode_with_loras(noisy, kind, span, noise_scale, first_step)
        self._live_change_chunks = max(self._live_change_chunks - 1, 0)
        return out

    def _open_event(
        self,
        latent_frames: int,
        kind: ChunkKind,
        span: tuple[int, int],
        noise_scale: torch.Tensor | None,
        first_step: torch.Tensor | None,
    ) -> ChunkEvent:
        """Number the next chunk, place it in RoPE positions and log it (before any denoising)."""
        k = self._chunk_counter
        self._chunk_counter += 1
        steps: list[int | torch.Tensor] = list(self.denoiser.steps)
        if first_step is not None:
            steps[0] = first_step
        event = ChunkEvent(
            chunk=k,
            kind=kind,
            input_frames=span,
            prompt=self.prompt.describe(),
            transition_left=self.prompt.transition_left,
            stream_start=self._stream_chunks == 0,
            position=self._position(latent_frames),
            _steps=steps,
            _noise_scale=noise_scale,
            trim=self._trim_next,
            loras=self.settings.lora_summary,
        )
        self._trim_next = 0
        self.events.append(event)
        return event

    def _denoise_and_decode_with_loras(
        self,
        noisy: torch.Tensor,
        kind: ChunkKind,
        span: tuple[int, int],
        noise_scale: torch.Tensor | None,
        first_step: torch.Tensor | None,
    ) -> torch.Tensor:
        self.prompt.advance()  # one transition step per chunk (a no-op otherwise)
        conditioning = self._conditioning()
        L = self.settings.frame_tokens
        event = self._open_event(noisy.shape[1], kind, span, noise_scale, first_step)
        k, start = event.chunk, event.position * L
        extension = self.conditioner.extension_for(event) if self.conditioner is not None else None
        self._in_flight.append(event)
        with self._stage("dit"):
            if self._stream_chunks == 0:
                finished = self.denoiser.first_chunk(noisy, start, conditioning, chunk=k, extension=extension)
            else:
                finished = self.denoiser.chunk(
                    noisy,
                    start,
                    first_step,
                    conditioning,
                    chunk=k,
                    extension=extension,
                    decode=kind != "flush",
                )
        self._stream_chunks += 1
        return self._concat([self._emit(done) for done in finished])

    def _emit(self, done: Finished) -> torch.Tensor:
        """A finished chunk → the output of the oldest chunk in flight (it must be that one)."""
        event = self._in_flight.popleft()
        if event.chunk != done.chunk:
            raise SessionError(
                f"denoiser order error: chunk {done.chunk} finished, chunk {event.chunk} was due"
            )
        frames = done.frames
        if frames is None:
            assert done.x0 is not None
            with self._stage("decode"):
                frames = self.codecs.decode(done.x0)  # [1, T, 3, H, W] in [-1, 1]
        if event.kind == "flush":
            return self._empty_output()  # a flush chunk carries no input: its output is thrown away
        if event.trim:
            frames = frames[:, : frames.shape[1] - event.trim]
        out = self._format(frames[0])
        event.output_frames = (self.frames_out, self.frames_out + out.shape[0])
        self.frames_out += out.shape[0]
        return out

    @property
    def _real_in_flight(self) -> int:
        """Chunks made from input or prompts that went into the denoiser and have not come out."""
        return sum(e.kind != "flush" for e in self._in_flight)

    @property
    def _lanes_lag(self) -> int:
        """The lag of stream batch in one process (N − 1 chunks; 0 with no batch): what the controls follow."""
        return len(self.settings.denoising_steps) - 1 if self.settings.batching == "stream" else 0

    def _drain_lanes(self) -> torch.Tensor:
        """End of input (or a draining cut): every real chunk in flight comes out."""
        if self._stream_chunks == 0:
            return self._empty_output()
        real = self._real_in_flight
        return self._finish(real, self._lanes_lag if real else 0)

    def _finish(self, due: int, single_flush: int) -> torch.Tensor:
        """Emit the oldest `due` real chunks in flight, running flush chunks (pure noise, output dropped)
        until they are through; then leave the prompt state and chunk counter as one process leaves them
        after `single_flush` flush chunks (a ring, whose lag is longer, runs more of them)."""
        if due <= 0:
            return self._empty_output()
        real_left = self._real_in_flight - due
        flush = max(0, self.denoiser.lag - real_left)  # the last due chunk needs `lag` chunks behind it
        saved = None
        outputs = []
        for i in range(flush):
            if i == single_flush:
                saved = (copy.deepcopy(self.prompt.state()), self._chunk_counter)
            c, s = self.components, self.settings
            shape = (1, 1, c.dit.config.in_dim, s.height // 8, s.width // 8)
            noisy = self.rng.randn(shape, chunk=self._chunk_counter, draw=0, device=c.device, dtype=c.dtype)
            outputs.append(
                self._denoise_and_decode(noisy, "flush", (self.frames_in, self.frames_in), None, None)
            )
        if saved is None:
            saved = (copy.deepcopy(self.prompt.state()), self._chunk_counter)
        while self._real_in_flight > real_left:
            outputs.append(self._emit(self.denoiser.wait()))
        self.prompt.load_state(saved[0])
        self._chunk_counter = saved[1]
        self.backend.forget_conditioning()  # the restored prompt state is prepared afresh
        return self._concat(outputs)

    def _format(self, frames: torch.Tensor) -> torch.Tensor:
        """[T, 3, H, W] in [-1, 1] → [T, H, W, 3] float in [0, 1] or uint8 (on the device)."""
        x = (frames.float() * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
        if self.output == "uint8":
            return (x * 255).round().to(torch.uint8)
        return x

    def _empty_output(self) -> torch.Tensor:
        s = self.settings
        dtype = torch.uint8 if self.output == "uint8" else torch.float32
        return torch.empty((0, s.height, s.width, 3), dtype=dtype, device=self.components.device)

    def _concat(self, outputs: list[torch.Tensor]) -> torch.Tensor:
        outputs = [o for o in outputs if o.shape[0]]
        if not outputs:
            return self._empty_output()
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    def _stage(self, name: str) -> AbstractContextManager[Any]:
        stack = ExitStack()
        stack.enter_context(self.denoiser.timing(name))
        if self.stage_timer is not None:
            stack.enter_context(self.stage_timer(name))
        return stack

    # ----------------------------------------------------------------------------------------------
    # Closing
    # ----------------------------------------------------------------------------------------------
    @_in_its_mode
    def close(self, reason: str = "closed") -> None:
        """Drop every per-stream buffer (KV cache, captured graphs and their pool, codec states, pending input).
        The session refuses further work; the shared models stay loaded."""
        if self.closed is not None:
            return
        self.closed = reason
        self.denoiser.close()
        self.codecs.reset()
        if self.conditioner is not None:
            self.conditioner.reset()
        self._pending.frames.clear()
        self._in_flight.clear()
        self.backend.forget_conditioning()

    def _close_after_oom(self, error_text: str) -> str:
        self.close("out of GPU memory")
        release_device_memory(self.components.device)
        return out_of_memory_message(error_text, self.components.device, self.settings)

    def log(self) -> SessionJournal:
        """The journal of this session (start it with `log=True`): every change and input frame, in order;
        `wanstream.takes.save_log` writes it to a file that `wanstream replay` reproduces bit for bit."""
        if self.journal is None:
            raise SessionError(
                "this session keeps no log: create it with log=True (Pipeline.session(log=True))"
            )
        return self.journal

    # ----------------------------------------------------------------------------------------------
    # Snapshots: capture the whole stream state and resume from it later
    # ----------------------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """A deep copy of every piece of stream state (not the models)."""
        return copy.deepcopy(
            {
                "settings": self.settings,
                "denoiser": self.denoiser.state(),
                "codecs": self.codecs.state(),
                "controller": self.controller.state(),
                "prompt": self.prompt.state(),
                "pending": self._pending,
                "counters": (
                    self.frames_in,
                    self.frames_out,
                    self._chunk_counter,
                    self._stream_chunks,
                    self._next_position,
                ),
                "in_flight": list(self._in_flight),
            }
        )

    @_in_its_mode
    def restore(self, snap: dict[str, Any]) -> None:
        if self.journal is not None:  # the state jumps to one the journal did not see being made
            self.journal.mark_unreplayable("the session was restored from a snapshot")
        snap = copy.deepcopy(snap)
        if snap["settings"] != self.settings:
            self.settings = snap["settings"]
            self._build()
        self.denoiser.load_state(snap["denoiser"])
        self.codecs.load_state(snap["codecs"])
        self.controller.load_state(snap["controller"])
        self.prompt.load_state(snap["prompt"])
        self.backend.forget_conditioning()
        self._pending = snap["pending"]
        (self.frames_in, self.frames_out, self._chunk_counter, self._stream_chunks, self._next_position) = (
            snap["counters"]
        )
        self._in_flight = deque(snap["in_flight"])
