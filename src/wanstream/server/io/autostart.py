"""`serve --ndi-in SOURCE`: the server restyles an NDI source from start-up, without a browser.

The session is an ordinary headless one (it shows in /api/v1/sessions, takes controls, gets the
`--sink` outputs) that no idle timeout ends; if it ends (the source failed, someone DELETEd it) it is
started again a few seconds later.
"""

from __future__ import annotations

import asyncio
import logging

from fastapi import HTTPException

from wanstream.server.config import ServerConfig
from wanstream.server.io.specs import NdiInput, SinkSpec
from wanstream.server.sessions import SessionManager

log = logging.getLogger("wanstream.server")
RETRY_S = 5.0


def check_io(config: ServerConfig) -> None:
    """ValueError naming the flag when --sink / --ndi-in cannot be understood."""
    for text in config.sinks:
        try:
            SinkSpec.parse(text)
        except ValueError as exc:
            raise ValueError(f"--sink {text}: {_first_error(exc)}") from None
    if config.ndi_in is not None:
        try:
            source = NdiInput.parse(config.ndi_in)
        except ValueError as exc:
            raise ValueError(f"--ndi-in {config.ndi_in}: {_first_error(exc)}") from None
        if source.address is None and not config.ndi_discovery:
            raise ValueError(
                f"--ndi-in {config.ndi_in}: with --no-ndi-discovery give the source as HOST:PORT"
            )


def _first_error(exc: ValueError) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        return "; ".join(str(e.get("msg", e)) for e in errors())
    return str(exc)


async def keep_ndi_input(manager: SessionManager) -> None:
    """Run the --ndi-in session for as long as the server runs."""
    from wanstream.server.api import open_headless  # the same start-up as POST /api/v1/sessions
    from wanstream.server.schemas import HeadlessRequest

    assert manager.config.ndi_in is not None
    request = HeadlessRequest(source="ndi", ndi=NdiInput.parse(manager.config.ndi_in))
    while True:
        if manager.model.pipeline is None:
            await asyncio.sleep(0.5)  # the model is still loading
            continue
        try:
            session = await open_headless(manager, request, idle_watch=False)
        except HTTPException as exc:
            log.warning("--ndi-in %s: the session did not start: %s", manager.config.ndi_in, exc.detail)
            await asyncio.sleep(RETRY_S)
            continue
        log.info("--ndi-in %s: session %s", manager.config.ndi_in, session.id)
        await session.closed.wait()
        await asyncio.sleep(RETRY_S)
