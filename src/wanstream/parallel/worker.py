"""Ranks 1..N−1: receive a batch from the previous rank, run this rank's blocks, pass it on.

The last rank finishes each batch: head, flow → x0, re-noising of every lane but the last to its next
step (exactly `Denoiser.chunk`'s arithmetic), the lanes back to rank 0, then the finished lane decoded
and its frames sent to rank 0. Control messages (configure, stop, measure, relayout) travel the same
path in order, so a rank never sees a batch of a stream it has not been configured for.
"""

from __future__ import annotations

import datetime
import os
import traceback
from typing import Any

import torch
import torch.distributed as dist

from wanstream.engine.rng import SeededNoise
from wanstream.engine.settings import StreamSettings
from wanstream.parallel.layout import Layout, device_for
from wanstream.parallel.ring import Link, Mailbox, RingError, join_groups
from wanstream.parallel.stage import Lane, Stage
from wanstream.parallel.timing import StageClock


class _ParentGone(Exception):
    pass


def worker_main(
    rank: int,
    world: int,
    port: int,
    source: Any,
    layout: Layout,
    device_type: str,
    timeout_s: float,
    cpu_threads: int,
    parent_pid: int,
) -> None:
    """Entry point of a spawned rank. Any failure is written to the store for rank 0 to report."""
    store = None
    try:
        if device_type == "cpu":
            torch.set_num_threads(cpu_threads)
        store = dist.TCPStore("127.0.0.1", port, world, False, timeout=datetime.timedelta(seconds=30))
        Worker(rank, world, store, source, layout, device_type, timeout_s, parent_pid).run()
    except _ParentGone:
        os._exit(0)
    except BaseException as exc:  # reported to rank 0, then this process ends
        message = f"{type(exc).__name__}: {exc}"
        if not isinstance(exc, RingError):
            message += "\n" + "".join(traceback.format_exception(exc)[-6:])
        try:
            if store is not None:
                store.set(f"error/{rank}", message)
        except Exception:  # rank 0 is gone too: nothing to report to
            pass
        os._exit(1)
    os._exit(0)


class Worker:
    def __init__(
        self,
        rank: int,
        world: int,
        store: dist.Store,
        source: Any,
        layout: Layout,
        device_type: str,
        timeout_s: float,
        parent_pid: int,
    ) -> None:
        self.rank, self.world = rank, world
        self.first, self.last = False, rank == world - 1
        self.prev, self.next = rank - 1, (rank + 1) % world
        self.parent_pid = parent_pid
        self.store = store
        self.device = device_for(device_type, rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        store.set(f"joined/{rank}", "1")
        dist.init_process_group(
            "nccl" if self.device.type == "cuda" else "gloo",
            store=dist.PrefixStore("pg", store),
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=max(timeout_s, 60.0)),
        )
        back = join_groups(world)
        self.components = source.build(self.device, layout[rank], first=False, last=self.last)
        self.layout = layout
        self.stage = Stage(
            self.components.dit,
            *layout[rank],
            first=False,
            last=self.last,
            ranks=world,
            compiled=self.components.optimized,
        )
        self.link = Link(Mailbox(store, rank, self._alive), self.device, timeout_s, world, back)
        self.decoder: Any = None
        self._noise_source, self._noise_seed = SeededNoise(0), 0
        self.clock = StageClock(self.device)
        store.set(f"ready/{rank}", "1")

    def _alive(self) -> None:
        """Rank 0 (the process that started the ring) still runs; else this rank has no purpose."""
        try:
            os.kill(self.parent_pid, 0)
        except ProcessLookupError:
            raise _ParentGone() from None

    def run(self) -> None:
        while True:
            header, tensors = self.link.recv(self.prev, "the next message", timeout=None)
            kind = header["kind"]
            if kind == "batch":
                self.batch(header, tensors)
            elif kind == "configure":
                self.configure(StreamSettings.model_validate(header["settings"]))
                self.forward_or_ack(header)
            elif kind == "measure":
                report = self.clock.report(self.rank, self.stage.stop - self.stage.start)
                header["stats"].append([*report, self.clock.peak_gib(self.device)])
                self.forward_or_ack(header)
            elif kind == "relayout":
                from wanstream.parallel.rebalance import migrate

                if not self.last:
                    self.link.send(self.next, header)  # everyone starts moving blocks at once
                new = [(int(a), int(b)) for a, b in header["layout"]]
                migrate(self.stage, self.layout, new, self.rank, self.link)
                self.layout = new
                self.clock.clear()
                if self.last:
                    self.link.send(0, {"kind": "ack", "of": "relayout"})
            elif kind == "stop":
                if not self.last:
                    self.link.send(self.next, header)
                self.link.flush()
                return
            else:
                raise RingError(f"rank {self.rank}: unknown message {kind!r}")

    def forward_or_ack(self, header: dict[str, Any]) -> None:
        if self.last:
            self.link.send(0, {**header, "kind": "ack", "of": header["kind"]})
        else:
            self.link.send(self.next, header)

    def configure(self, settings: StreamSettings) -> None:
        self.stage.configure(settings)
        if self.last:
            from wanstream.engine.codecs import Codecs

            # Only the decoder is used here: build the codecs as a text-mode stream would (no encoder).
            self.decoder = Codecs.create(
                self.components, settings.model_copy(update={"mode": "text"})
            ).decoder
        self.clock.clear()

    # ----------------------------------------------------------------------------------------------
    def batch(self, header: dict[str, Any], tensors: list[torch.Tensor]) -> None:
        n_ctx = len(header["contexts"])
        contexts, (x, t, h, e0, e) = tensors[:n_ctx], tensors[n_ctx:]
        for version, ctx in zip(header["contexts"], contexts):
            self.stage.add_context(version, ctx)
        if header.get("reset"):
            self.stage.reset()
            if self.last:
                self.decoder.reset()
        lanes = [Lane.from_json(row) for row in header["lanes"]]
        steady = all(lane.live for lane in lanes) and not header.get("first")
        with self.clock.batch(steady):
            self._run(header, lanes, contexts, x, t, h, e0, e)

    def _run(
        self,
        header: dict[str, Any],
        lanes: list[Lane],
        contexts: list[torch.Tensor],
        x: torch.Tensor,
        t: torch.Tensor,
        h: torch.Tensor,
        e0: torch.Tensor,
        e: torch.Tensor,
    ) -> None:
        frames = header["frames"]
        with self.clock("dit"):
            h = self.stage.blocks(h, e0, lanes, frames)
        if header.get("broadcast"):
            self.stage.cache.broadcast_lane0()  # type: ignore[union-attr]
        if not self.last:
            self.link.send(self.next, header, [*contexts, x, t, h, e0, e])
            return
        with self.clock("dit"):
            flow = self.stage.head(h, e, frames)
            scheduler = self.components.scheduler
            x0 = scheduler.flow_to_x0(flow.flatten(0, 1), x.flatten(0, 1), t.flatten(0, 1)).unflatten(
                0, x.shape[:2]
            )
            hidden = self.renoise(x0, lanes, header.get("first", False))
        self.link.send(0, {"kind": "return", "seq": header["seq"]}, [hidden])
        for j, lane in enumerate(lanes):
            if lane.decode:
                with self.clock("decode"):
                    out = self.decoder(x0[j : j + 1])
                self.link.send(0, {"kind": "frames", "chunk": lane.chunk, "seq": header["seq"]}, [out])

    def _noise(self, seed: int) -> SeededNoise:
        """One noise source per seed (its generators are reused; a seed change makes a new one)."""
        if self._noise_seed != seed:
            self._noise_source, self._noise_seed = SeededNoise(seed), seed
        return self._noise_source

    def renoise(self, x0: torch.Tensor, lanes: list[Lane], first: bool) -> torch.Tensor:
        """Each lane's x0 re-noised to its next step, as the single-process `Denoiser` does it."""
        scheduler = self.components.scheduler
        if first:  # the first chunk's sequential steps (`Denoiser._denoise_sequential`)
            lane = lanes[0]
            if lane.renoise is None:
                return x0
            eps = self._noise(lane.seed).randn(
                x0.flatten(0, 1).shape, chunk=lane.chunk, draw=1 + lane.step, device=x0.device, dtype=x0.dtype
            )
            return scheduler.add_noise(x0.flatten(0, 1), eps, float(lane.renoise)).unflatten(0, x0.shape[:2])
        hidden = x0.clone()
        for i, lane in enumerate(lanes):
            if lane.live and lane.renoise is not None:
                eps = self._noise(lane.seed).randn(
                    x0[i : i + 1].shape, chunk=lane.chunk, draw=1 + i, device=x0.device, dtype=x0.dtype
                )
                hidden[i : i + 1] = scheduler.add_noise(x0[i : i + 1], eps, float(lane.renoise))
        return hidden
