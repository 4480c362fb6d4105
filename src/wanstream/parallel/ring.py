"""Point-to-point messages between the ranks of the ring: small JSON headers, then tensors.

Headers travel through the TCP store that rank 0 hosts (one key per message, deleted once read):
waiting for one is a poll with a deadline that also checks, every few milliseconds, that the other
processes are still alive — a dead rank is reported at once instead of blocking a receive forever. A
header lists the shapes and dtypes of the tensors that follow, which travel over the data process group
(NCCL between GPUs, gloo on the CPU) in the order the header lists them. Receives are only posted for
messages whose header has arrived, so both sides of a pair always issue their operations in the same
order (NCCL matches point-to-point operations by order, not by tag).

On a GPU, sends and receives run on the process group's own CUDA streams: a send does not wait for the
compute that follows it, a receive only makes the compute stream wait for its data, so transfers overlap
compute without host synchronisation.
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


class RingError(RuntimeError):
    """The ring cannot go on: a rank died, failed or timed out. The message says which and why."""


class RingTimeout(RingError):
    pass


_DTYPES = {
    str(d): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.uint8)
}


class Mailbox:
    """Ordered header messages per (sender, receiver) pair, through the rank-0 TCP store."""

    def __init__(self, store: dist.Store, rank: int, alive: Callable[[], None]) -> None:
        self.store = store
        self.rank = rank
        self.alive = alive  # raises RingError when a process the ring needs has gone
        self._sent: dict[int, int] = {}
        self._taken: dict[int, int] = {}

    def post(self, dst: int, header: dict[str, Any]) -> None:
        seq = self._sent.get(dst, 0)
        self._sent[dst] = seq + 1
        self.store.set(f"mb/{self.rank}>{dst}/{seq}", json.dumps(header))

    def _key(self, src: int) -> str:
        return f"mb/{src}>{self.rank}/{self._taken.get(src, 0)}"

    def poll(self, src: int) -> dict[str, Any] | None:
        """The next header from `src` if it has arrived, else None (never waits)."""
        key = self._key(src)
        if not self.store.check([key]):
            return None
        return self._read(src, key)

    def take(self, src: int, timeout: float | None, what: str) -> dict[str, Any]:
        """The next header from `src`; waits up to `timeout` seconds (None: as long as everyone lives)."""
        key = self._key(src)
        start = time.monotonic()
        last_check, pause = start, 2e-5
        while not self.store.check([key]):
            now = time.monotonic()
            if now - last_check > 0.02:
                self.alive()
                last_check = now
            if timeout is not None and now - start > timeout:
                raise RingTimeout(f"rank {self.rank}: no message from rank {src} for {timeout:g} s ({what})")
            time.sleep(pause)
            pause = min(pause * 2, 2e-3)  # back off while idle; stays fast while streaming
        return self._read(src, key)

    def _read(self, src: int, key: str) -> dict[str, Any]:
        raw = self.store.get(key)
        self.store.delete_key(key)
        self._taken[src] = self._taken.get(src, 0) + 1
        return json.loads(raw)


class Link:
    """Headers plus tensors to and from the neighbours of one rank.

    Tensors from the last rank back to rank 0 travel in their own process group (`back`): NCCL runs a
    communicator's operations in order on one stream, so with two ranks a batch going 0 → 1 and lanes
    coming back 1 → 0 on the same communicator could each wait for the other."""

    def __init__(
        self,
        mailbox: Mailbox,
        device: torch.device,
        timeout: float,
        world: int,
        back: Any = None,
        max_outstanding: int = 16,
    ) -> None:
        self.mailbox = mailbox
        self.device = device
        self.timeout = timeout
        self.world = world
        self.back = back
        self.max_outstanding = max_outstanding
        self._outstanding: deque[tuple[Any, torch.Tensor]] = deque()

    def _group(self, src: int, dst: int) -> Any:
        return self.back if (src, dst) == (self.world - 1, 0) else None

    @property
    def rank(self) -> int:
        return self.mailbox.rank

    def send(self, dst: int, header: dict[str, Any], tensors: Sequence[torch.Tensor] = ()) -> None:
        """Post the tensors (asynchronously) and the header that announces them."""
        header = dict(header)
        header["tensors"] = [[list(t.shape), str(t.dtype)] for t in tensors]
        # The header goes first: NCCL creates a pair's communicator at its first send, blocking until the
        # receiver joins, and the receiver only posts its receives once it has read the header.
        self.mailbox.post(dst, header)
        for t in tensors:
            t = t.contiguous()
            work = dist.isend(t, dst, group=self._group(self.rank, dst))
            self._outstanding.append((work, t))  # keep the tensor alive until sent
        self._retire()

    def _retire(self) -> None:
        """Bound the sends in flight: wait for the oldest beyond the limit (normally long finished)."""
        while self._outstanding and (
            len(self._outstanding) > self.max_outstanding or _done(self._outstanding[0][0])
        ):
            work, _ = self._outstanding.popleft()
            self._wait(work, "a send")

    def flush(self) -> None:
        while self._outstanding:
            work, _ = self._outstanding.popleft()
            self._wait(work, "a send")

    def recv(
        self, src: int, what: str, timeout: float | None = -1.0, host_wait: bool = False
    ) -> tuple[dict[str, Any], list[torch.Tensor]]:
        """The next header from `src` and its tensors. `timeout` -1: the link's; None: no limit (idle).

        On a GPU the tensors are ready for the current stream; `host_wait` also waits on the host (for
        data handed to code outside the ring, which would otherwise block in a sync if a sender died)."""
        header = self.mailbox.take(src, self.timeout if timeout == -1.0 else timeout, what)
        return header, self.recv_tensors(src, header, what, host_wait)

    def poll(
        self, src: int, what: str, host_wait: bool = False
    ) -> tuple[dict[str, Any], list[torch.Tensor]] | None:
        header = self.mailbox.poll(src)
        if header is None:
            return None
        return header, self.recv_tensors(src, header, what, host_wait)

    def recv_tensors(
        self, src: int, header: dict[str, Any], what: str, host_wait: bool = False
    ) -> list[torch.Tensor]:
        out = []
        for shape, dtype in header.get("tensors", []):
            buf = torch.empty(shape, dtype=_DTYPES[dtype], device=self.device)
            work = dist.irecv(buf, src, group=self._group(src, self.rank))
            if self.device.type == "cuda" and not host_wait:
                work.wait()  # the current stream waits for the data; the host goes on
            else:
                self._wait(work, f"{what} from rank {src}")
            out.append(buf)
        return out

    def _wait(self, work: Any, what: str) -> None:
        """Wait for one operation on the host, within the link's timeout, checking the others live."""
        if self.device.type == "cuda":
            start = time.monotonic()
            while not work.is_completed():
                self.mailbox.alive()
                if time.monotonic() - start > self.timeout:
                    raise RingTimeout(f"rank {self.rank}: {what} did not complete in {self.timeout:g} s")
                time.sleep(1e-4)
            work.wait()
            return
        try:
            work.wait(timedelta(seconds=self.timeout))  # gloo: a dead peer fails this at once
        except RuntimeError as exc:
            self.mailbox.alive()  # prefer "rank N died" over gloo's socket message
            raise RingError(f"rank {self.rank}: {what} failed: {exc}") from exc


def join_groups(world: int) -> Any:
    """Collective, on every rank after `init_process_group`: the group for tensors last rank → rank 0."""
    return dist.new_group(ranks=[0, world - 1])


def _done(work: Any) -> bool:
    try:
        return bool(work.is_completed())
    except RuntimeError:
        return True  # failed: `_wait` raises with the reason
