"""What rank 0's ring offers the code that drives it: the contract between `launch.Ring` and its users.

`RingDenoiser` (a session's chunks) and `rebalance` (moving blocks between ranks) work against this protocol,
not against `launch.Ring` itself: the launcher builds and owns them, so they must not import it back.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

import torch

from wanstream.engine.components import Components
from wanstream.engine.settings import StreamSettings
from wanstream.parallel.layout import Layout
from wanstream.parallel.ring import Link, RingError
from wanstream.parallel.stage import Stage
from wanstream.parallel.timing import StageClock


class RingHost(Protocol):
    world: int  # ranks, this one (rank 0) included
    layout: Layout  # the DiT blocks each rank holds
    components: Components  # rank 0's networks: text encoder, VAE, its own blocks
    stage: Stage  # rank 0's slice of the DiT and its stream state
    link: Link  # messages and tensors to and from the other ranks
    clock: StageClock  # measured stage times (for the rebalancer)
    lock: AbstractContextManager[Any]  # one ring operation at a time per process (a re-entrant lock)
    broken: str | None  # why the ring is down, or None
    rebalance_after: int | None  # steady batches before the one automatic rebalance
    rebalanced: bool
    warmup_timeout_s: float  # the waits of a stream's first batches (ranks may be compiling)

    @property
    def device(self) -> torch.device: ...

    def next_version(self) -> int:
        """A new number for the conditioning every rank keeps (prompt changes)."""
        ...

    def claim(self, denoiser: Any) -> None:
        """`denoiser` now owns the ring; the previous owner finishes what it has in flight first."""
        ...

    def configure(self, settings: StreamSettings) -> None:
        """Every rank (re)allocates its stream state for these settings."""
        ...

    def rebalance(self, layout: Sequence[Sequence[int]] | None = None) -> Layout: ...

    def quiesce(self) -> None:
        """Let the stream in flight come back before a control message."""
        ...

    def guarded(self) -> AbstractContextManager[None]:
        """Ring communication: any failure inside takes the ring down with a clear reason."""
        ...

    def ensure_ok(self) -> None: ...

    def fail(self, reason: str) -> RingError:
        """Mark the ring broken and stop the workers; returns the error to raise."""
        ...
