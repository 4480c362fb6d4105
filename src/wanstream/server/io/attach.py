"""A new session's sinks: the ones its request names, else the server's `--sink` defaults."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from wanstream.server.io.sinks import SinkUnavailable
from wanstream.server.io.specs import SinkSpec

if TYPE_CHECKING:
    from wanstream.server.sessions import Session, SessionManager

log = logging.getLogger("wanstream.server")


async def attach_sinks(manager: SessionManager, session: Session, requested: list[SinkSpec] | None) -> None:
    """Open and attach sinks. Sinks a request names must all open (else the start fails with the reason);
    a server default that cannot open here is logged and skipped (the stream is not refused for it)."""
    if requested is not None:
        for spec in requested:
            await manager.add_sink(session, spec)
        return
    for text in manager.config.sinks:
        try:
            await manager.add_sink(session, SinkSpec.parse(text))
        except (ValueError, SinkUnavailable) as exc:
            log.warning("session %s: the default sink %s did not open: %s", session.id, text, exc)
