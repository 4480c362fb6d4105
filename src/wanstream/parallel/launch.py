"""Start a ring: this process is rank 0, ranks 1..N−1 are spawned processes (one per GPU).

NCCL carries tensors between GPUs, gloo between CPU processes (tests, `--device cpu`); small headers
go through the TCP store this process hosts. Each rank builds only what it runs from a `ModelSource`:
rank 0 the text encoder, the VAE (it encodes) and the first blocks with the embeddings; the last rank
its blocks, the head and the VAE/TAEHV (it decodes); middle ranks only their blocks.

Failure handling: every wait checks that the workers are alive (rank 0 is their parent), so a dead rank
ends the stream with a `RingError` naming it within milliseconds; a rank that fails with an exception
writes it to the store before exiting, and that message is what rank 0 reports. Workers exit when rank
0 does (their store connection breaks, and they watch their parent).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.distributed as dist

from wanstream.engine.components import Components
from wanstream.parallel.layout import Layout, check_layout, device_for, split_blocks
from wanstream.parallel.ring import Link, Mailbox, RingError, join_groups
from wanstream.parallel.stage import Absent, Stage, keep_blocks
from wanstream.parallel.timing import StageClock

if TYPE_CHECKING:
    from wanstream.engine.session import OutputFormat, StreamSession
    from wanstream.engine.settings import StreamSettings
    from wanstream.parallel.denoiser import RingDenoiser

# How long a communication failure waits for a dead worker to show before it is reported as the failure itself.
DEATH_NOTICE_S = 2.0
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelSource:
    """How each rank builds its networks; picklable (it is sent to the spawned processes)."""

    kind: Literal["demo", "random", "files"] = "demo"
    models_dir: str | None = None  # files: the downloaded weights (default location when None)
    dtype: str = "float32"
    seed: int = 0
    num_layers: int = 2  # demo: DiT depth
    tiny: bool = False  # random: tiny networks (a CPU smoke test of the benchmark)
    optimize: bool = False  # GPU: fused q/k/v, compiled blocks and cache bookkeeping
    taehv: bool = True  # files: also TAEHV when downloaded

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    def dit_layers(self) -> int:
        if self.kind == "demo":
            return self.num_layers
        if self.kind == "random":
            return 2 if self.tiny else 30
        from wanstream.models.dit import WanConfig
        from wanstream.weights.store import resolve_pipeline_files

        return WanConfig.from_json(resolve_pipeline_files(models_dir=self.models_dir).config).num_layers

    def build(
        self, device: torch.device, block_range: tuple[int, int], *, first: bool, last: bool
    ) -> Components:
        """This rank's networks: its blocks (others freed), plus what its role needs."""
        if self.kind == "demo":
            from wanstream.engine.random_weights import demo_components

            c = demo_components(
                device, self.torch_dtype, self.seed, num_layers=self.num_layers, text_encoder=first
            )
            c.vace = None
        elif self.kind == "random":
            from wanstream.engine.random_weights import random_components

            c = random_components(device, self.torch_dtype, tiny=self.tiny)
        else:
            c = _load_files(self, device, first=first, last=last)
        if not first:
            c.text_encoder = None
        if not (first or last):
            c.wan_vae = c.taehv = None
        keep_blocks(c.dit, *block_range, first=first, last=last)
        if c.wan_vae is not None:  # rank 0 only encodes, the last rank only decodes (TAEHV, ~10 MB, stays)
            if first:
                c.wan_vae.decoder = Absent("the Wan VAE decoder (on the last rank)")
            if last:
                c.wan_vae.encoder = Absent("the Wan VAE encoder (on rank 0)")
        c.dit.to(device)  # files: workers load on the CPU; only what they keep moves
        if self.optimize and device.type == "cuda":
            _optimize(c, range(*block_range), vae=first or last)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return c


def _load_files(source: ModelSource, device: torch.device, *, first: bool, last: bool) -> Components:
    if first:  # rank 0: everything `Pipeline.load` loads (blocks it does not own are freed after)
        from wanstream.weights.pipeline import load_networks

        networks = load_networks(
            source.models_dir, device=device, dtype=source.torch_dtype, taehv=source.taehv
        )
        return Components(device=device, dtype=source.torch_dtype, **vars(networks))
    from wanstream.models.dit import WanConfig
    from wanstream.weights.dit import load_dit
    from wanstream.weights.store import resolve_pipeline_files

    files = resolve_pipeline_files(models_dir=source.models_dir)
    # Loaded on the CPU: only this rank's blocks move to the GPU (see `Ring._worker_components`).
    dit = load_dit(files.generator, WanConfig.from_json(files.config), dtype=source.torch_dtype, device="cpu")
    vae = tae = None
    if last:
        from wanstream.weights.vae import load_wan_vae

        vae = load_wan_vae(files.vae, dtype=source.torch_dtype, device=device)
        if source.taehv and files.taehv is not None and files.taehv.exists():
            from wanstream.weights.tae import load_taehv

            tae = load_taehv(
                files.taehv,
                dtype=torch.float16 if device.type == "cuda" else source.torch_dtype,
                device=device,
            )
    return Components(dit=dit, device=device, dtype=source.torch_dtype, wan_vae=vae, taehv=tae, label="")


def _optimize(c: Components, blocks: range, *, vae: bool) -> None:
    """`Components.optimize` for a DiT of which only `blocks` are here."""
    for i in blocks:
        c.dit.blocks[i].self_attn.fuse_qkv()
    c.dit.optimize(compile=True, fuse_qkv=False)
    if vae and c.wan_vae is not None:
        c.wan_vae.optimize(channels_last=True, compile=True)  # type: ignore[operator]
    c.optimized = True


def _process_context() -> Any:
    """Fresh processes (never a fork of this one: CUDA and threads do not survive a fork). Where it
    exists, a fork server that has imported torch once starts them: a ring starts in a fraction of a
    second after the first instead of re-importing torch in every process."""
    import multiprocessing

    if "forkserver" in multiprocessing.get_all_start_methods():
        context = torch.multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["torch", "wanstream.parallel.worker"])
        return context
    return torch.multiprocessing.get_context("spawn")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------
class Ring:
    """A running ring of `world` ranks; this process is rank 0. Use `Ring.start(...)`, then `session()`."""

    _active: Ring | None = None  # one ring per process (torch.distributed's default group)

    def __init__(self) -> None:
        raise TypeError("use Ring.start(...)")

    @classmethod
    def start(
        cls,
        source: ModelSource,
        world: int,
        *,
        device: str = "cuda",
        layout: Sequence[Sequence[int]] | None = None,
        timeout_s: float = 60.0,
        startup_timeout_s: float = 900.0,
        cpu_threads: int = 1,
        rebalance_after: int | None = None,
        warmup_timeout_s: float | None = None,
    ) -> Ring:
        """Spawn ranks 1..world−1, build every rank's networks and connect them.

        `device` "cuda": one GPU per rank (NCCL); "cpu": CPU processes (gloo), for tests and demos.
        `timeout_s` bounds every wait inside a stream (a dead rank is noticed at once regardless: this
        is for a rank that hangs); `startup_timeout_s` the model loading; `warmup_timeout_s` (default:
        the startup one) the waits of a stream's first batches, where ranks may compile their blocks for
        new shapes (optimized GPU runs).
        `rebalance_after`: once this many steady batches are measured, move blocks between ranks to
        balance their measured times (once per ring; see `rebalance.py`)."""
        if world < 2:
            raise ValueError("a ring needs at least 2 ranks (one GPU runs the single-process engine)")
        if device not in ("cuda", "cpu"):
            raise ValueError(f"ring device must be 'cuda' or 'cpu', got {device!r}")
        if device == "cuda":
            found = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if found < world:
                raise RingError(
                    f"--gpus {world} needs {world} CUDA GPUs, this machine has {found}"
                    + ("" if found else " (no CUDA)")
                    + "; use fewer GPUs, or CPU processes for a test (--device cpu)"
                )
        if cls._active is not None or dist.is_initialized():
            raise RingError("a ring (torch.distributed process group) is already running in this process")
        num_layers = source.dit_layers()
        blocks = (
            check_layout(layout, num_layers, world) if layout is not None else split_blocks(num_layers, world)
        )
        ring = object.__new__(cls)
        ring._init(source, world, device, blocks, timeout_s, startup_timeout_s, cpu_threads)
        ring.rebalance_after = rebalance_after
        ring.warmup_timeout_s = max(
            timeout_s, startup_timeout_s if warmup_timeout_s is None else warmup_timeout_s
        )
        return ring

    def _init(
        self,
        source: ModelSource,
        world: int,
        device_type: str,
        layout: Layout,
        timeout_s: float,
        startup_timeout_s: float,
        cpu_threads: int,
    ) -> None:
        from wanstream.parallel.worker import worker_main

        self.source, self.world, self.device_type = source, world, device_type
        self.layout = layout
        self.timeout_s = timeout_s
        self.warmup_timeout_s = max(timeout_s, startup_timeout_s)  # see `start`
        self.broken: str | None = None
        self.active: RingDenoiser | None = None
        self.rebalance_after: int | None = None
        self.rebalanced = False
        self._version = 0
        self.lock = threading.RLock()  # one ring operation at a time (sessions may run on threads)
        port = _free_port()
        self.store = dist.TCPStore(
            "127.0.0.1",
            port,
            world,
            True,
            timeout=datetime.timedelta(seconds=startup_timeout_s),
            wait_for_workers=False,
        )
        context = _process_context()
        self.procs = []
        for rank in range(1, world):
            proc = context.Process(
                target=worker_main,
                args=(rank, world, port, source, layout, device_type, timeout_s, cpu_threads, os.getpid()),
                name=f"wanstream-rank{rank}",
                daemon=True,
            )
            proc.start()
            self.procs.append(proc)
        Ring._active = self
        try:
            self._wait_keys("joined", startup_timeout_s, "start")
            device = device_for(device_type, 0)
            if device.type == "cuda":
                torch.cuda.set_device(device)
                # A hung NCCL transfer past the group's timeout aborts its communicators and fails the
                # wait, instead of the watchdog killing this process (which may be a server).
                os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
            dist.init_process_group(
                "nccl" if device.type == "cuda" else "gloo",
                store=dist.PrefixStore("pg", self.store),
                rank=0,
                world_size=world,
                timeout=datetime.timedelta(seconds=max(timeout_s, 60.0)),
            )
            back = join_groups(world)  # collective: right after the init, as every rank does
            self.components = source.build(device, layout[0], first=True, last=False)
            self.stage = Stage(
                self.components.dit,
                *layout[0],
                first=True,
                last=False,
                ranks=world,
                compiled=self.components.optimized,
            )
            self.link = Link(Mailbox(self.store, 0, self.check_alive), device, timeout_s, world, back)
            self.clock = StageClock(device)
            self._wait_keys("ready", startup_timeout_s, "load the model")
        except BaseException:
            self.close()
            raise

    # ----------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.components.device

    @property
    def label(self) -> str:
        return f"{self.components.label} · {self.world}-rank ring ({self.device_type}), blocks {self.layout}"

    def next_version(self) -> int:
        self._version += 1
        return self._version

    def session(
        self,
        settings: StreamSettings | None = None,
        *,
        prompts: Sequence[Any] | None = None,
        output: OutputFormat = "uint8",
        **overrides: Any,
    ) -> StreamSession:
        """A new stream on the ring (a previous session of this ring stops working)."""
        from wanstream.engine.session import StreamSession
        from wanstream.engine.settings import StreamSettings
        from wanstream.parallel.denoiser import RingBackend

        base = settings or StreamSettings()
        if overrides:
            base = StreamSettings.model_validate({**base.model_dump(), **overrides})
        return StreamSession(self.components, base, prompts=prompts, output=output, backend=RingBackend(self))

    def claim(self, denoiser: RingDenoiser) -> None:
        """`denoiser` now owns the ring; the previous one finishes what it has in flight first."""
        with self.lock:
            self._claim(denoiser)

    def _claim(self, denoiser: RingDenoiser) -> None:
        self.ensure_ok()
        if self.active is not None and self.active is not denoiser:
            self.active.quiesce()
            self.active.closed = True
        self.active = denoiser

    def rebalance(self, layout: Sequence[Sequence[int]] | None = None) -> Layout:
        """Move blocks between ranks: to `layout`, or to the balanced one from measured stage times."""
        from wanstream.parallel.rebalance import rebalance

        with self.lock:
            self.rebalanced = True
            return rebalance(self, layout)

    def configure(self, settings: StreamSettings) -> None:
        """Every rank (re)allocates its stream state for `settings`; returns when all have."""
        with self.lock:
            self._configure(settings)

    def _configure(self, settings: StreamSettings) -> None:
        self.ensure_ok()
        self.quiesce()
        self.stage.configure(settings)
        with self.guarded():
            self.link.send(1, {"kind": "configure", "settings": settings.model_dump(mode="json")})
            header, _ = self.link.recv(self.world - 1, "configure acknowledgement")
        if header.get("kind") != "ack":
            raise self.fail(f"ring protocol error: expected an acknowledgement, got {header.get('kind')!r}")

    def quiesce(self) -> None:
        """Let the stream in flight come back before a control message (the last rank answers rank 0
        in order: an answer must not be read where a batch's lanes are due)."""
        with self.lock:
            if self.active is not None:
                self.active.quiesce()

    # ----------------------------------------------------------------------------------------------
    @contextmanager
    def guarded(self) -> Iterator[None]:
        """Ring communication: any failure or timeout inside takes the ring down with a clear reason."""
        try:
            yield
        except RingError as exc:
            if self.broken is None:
                raise self.fail(str(exc)) from exc
            raise
        except (RuntimeError, OSError) as exc:
            self._blame_a_dead_rank()  # a dead rank explains it best
            raise self.fail(f"rank 0: ring communication failed: {exc}") from exc

    def _blame_a_dead_rank(self) -> None:
        """Raise the exit of a worker that died, waiting up to `DEATH_NOTICE_S` for it to show: a peer's
        transport notices a killed process (connection closed) before the process table does."""
        deadline = time.monotonic() + DEATH_NOTICE_S
        while True:
            self.check_alive()
            if time.monotonic() >= deadline:
                return
            time.sleep(0.02)

    def ensure_ok(self) -> None:
        if self.broken is not None:
            raise RingError(f"the ring is down: {self.broken}")

    def check_alive(self) -> None:
        """Raise `RingError` (and tear the ring down) if any worker process has exited."""
        for rank, proc in enumerate(self.procs, start=1):
            if proc.exitcode is not None:
                raise self.fail(self._describe_exit(rank, proc))

    def _describe_exit(self, rank: int, proc: Any) -> str:
        role = "last rank" if rank == self.world - 1 else "middle rank"
        try:
            if self.store.check([f"error/{rank}"]):
                return f"rank {rank} ({role}) failed: {self.store.get(f'error/{rank}').decode()}"
        except (RuntimeError, dist.DistError):
            pass
        code = proc.exitcode
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        return f"rank {rank} ({role}, pid {proc.pid}) died unexpectedly ({how})"

    def fail(self, reason: str) -> RingError:
        """Mark the ring broken, stop every worker; returns the error to raise."""
        if self.broken is None:
            self.broken = reason
            self._stop_workers(graceful=False)
        return RingError(f"the ring is down: {self.broken}")

    def _wait_keys(self, prefix: str, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        for rank in range(1, self.world):
            while not self.store.check([f"{prefix}/{rank}"]):
                self.check_alive()
                if time.monotonic() > deadline:
                    raise self.fail(f"rank {rank} did not {what} within {timeout:g} s")
                time.sleep(0.01)

    def close(self) -> None:
        """Stop the workers and release the process group (idempotent)."""
        with self.lock:
            self._close()

    def _close(self) -> None:
        if Ring._active is not self:
            return
        graceful = self.broken is None and dist.is_initialized() and hasattr(self, "link")
        if graceful:
            try:
                self.quiesce()
                self.link.send(1, {"kind": "stop"})
                self.link.flush()
            except RingError:
                graceful = False
        self._stop_workers(graceful=graceful)
        if dist.is_initialized():
            if not graceful and self.device_type == "cuda":
                with contextlib.suppress(Exception):  # NCCL operations may wait on a dead peer: abort them
                    from torch.distributed.distributed_c10d import _abort_process_group

                    _abort_process_group()
            if dist.is_initialized():
                dist.destroy_process_group()
        Ring._active = None
        self.broken = self.broken or "closed"

    def _stop_workers(self, graceful: bool) -> None:
        if graceful:
            for proc in self.procs:
                proc.join(timeout=10)
        for proc in self.procs:
            if proc.exitcode is None:
                proc.kill()
        for proc in self.procs:
            proc.join(timeout=10)

    def __enter__(self) -> Ring:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
