"""The FastAPI app: routes, the security guard, the studio's static files, start-up and shutdown.

    app = create_app(ServerConfig(demo=True))
    uvicorn.run(app, host="127.0.0.1", port=8000)

Shutdown closes every session (peers, worker threads, recordings) before the process exits.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from starlette.types import Scope

from wanstream import __version__
from wanstream.engine.estimate import load_rows
from wanstream.engine.warm_up import lane_classes
from wanstream.server.api import router
from wanstream.server.config import ServerConfig
from wanstream.server.control_api import router as control_router
from wanstream.server.io import hardware, ndi
from wanstream.server.io.api import router as io_router
from wanstream.server.io.autostart import check_io, keep_ndi_input
from wanstream.server.limits import BodyLimit
from wanstream.server.loras_api import LoraJobs
from wanstream.server.loras_api import router as loras_router
from wanstream.server.model import ModelManager
from wanstream.server.osc import start_osc
from wanstream.server.prompts_api import ExtenderFactory, ExtenderHolder, default_factory
from wanstream.server.prompts_api import router as prompts_router
from wanstream.server.replays import ReplayJobs
from wanstream.server.security import RedactTokens, RequestGuard, check_bind, is_loopback
from wanstream.server.sessions import SessionManager, default_settings
from wanstream.server.timeline_api import router as timeline_router

log = logging.getLogger("wanstream.server")

STATIC_DIR = Path(__file__).parent / "static"

_PLACEHOLDER = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>wanstream</title>
<style>body{background:#111;color:#ddd;font:16px/1.5 system-ui,sans-serif;max-width:40em;margin:4em auto}
code{color:#9cf}</style></head><body>
<h1>wanstream server</h1>
<p>The studio (the browser interface) is not built into this install.</p>
<p>The server is running: the API is documented at <a href="/docs"><code>/docs</code></a>,
its status is at <a href="/health"><code>/health</code></a> and <a href="/metrics"><code>/metrics</code></a>.</p>
</body></html>
"""


class StudioFiles(StaticFiles):
    """The studio's files, revalidated on every load (a 304 when unchanged), so a page never mixes the
    scripts of an old install with a new server."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers["Cache-Control"] = "no-cache"
        return response


def create_app(
    config: ServerConfig, *, model: ModelManager | None = None, extender: ExtenderFactory | None = None
) -> FastAPI:
    """The server app. Raises `SecurityError` for an unsafe configuration (non-local bind, no token).
    `extender` builds the prompt extender at its first use (default: the local model of the models folder)."""
    check_bind(config.host, config.token)
    if config.max_sessions < 1:
        raise ValueError(f"max_sessions must be at least 1, got {config.max_sessions}")
    if config.media_dir is not None and not config.media_dir.is_dir():
        raise ValueError(f"the media folder {config.media_dir} does not exist")
    if config.lora_dir is not None and not config.lora_dir.is_dir():
        raise ValueError(f"the LoRA folder {config.lora_dir} does not exist")
    if config.gpus > 1 and config.max_sessions != 1:
        raise ValueError(f"--gpus {config.gpus} runs one stream over the GPUs: max_sessions must be 1")
    check_io(config)
    ndi.configure(discovery=config.ndi_discovery)
    model = model or ModelManager(
        demo=config.demo,
        models_dir=config.models_dir,
        device=config.device,
        vace=config.vace,
        gpus=config.gpus,
        random_weights=config.random_weights,
        text_encoder=config.text_encoder,
        precision=config.precision,
        reproducible=config.reproducible_takes,
        warm_up=(lambda pipeline: lane_classes(default_settings(config, demo=pipeline.is_demo)))
        if config.warm_up
        else None,
    )
    own_recordings = config.recordings_dir is None
    recordings_dir = config.recordings_dir or Path(tempfile.mkdtemp(prefix="wanstream-recordings-"))
    sessions = SessionManager(config, model, recordings_dir)
    sessions.estimate_rows = load_rows()  # measured memory / FPS per GPU (bench --write-estimates)
    replays = ReplayJobs(sessions, recordings_dir / "replays")  # takes replayed on the server

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Here, after the server has configured its logging: access-log lines never carry a token.
        access_log = logging.getLogger("uvicorn.access")
        if not any(isinstance(f, RedactTokens) for f in access_log.filters):
            access_log.addFilter(RedactTokens())
        if config.preload and model.status().state == "not_loaded":
            model.start_load()
        osc_transport = None
        if config.osc:
            try:
                osc_transport, app.state.osc = await start_osc(
                    sessions,
                    config.host,
                    app.state.osc_port,
                    config.token,
                    config.osc_allow,
                    exposed=not is_loopback(config.host),
                )
            except OSError as exc:  # the port is taken: the server runs, without OSC, and says why
                app.state.osc_error = f"OSC could not listen on UDP port {app.state.osc_port}: {exc}"
                log.error("%s", app.state.osc_error)
        ndi_input = asyncio.create_task(keep_ndi_input(sessions)) if config.ndi_in else None
        io_check = asyncio.create_task(asyncio.to_thread(hardware.io_availability))  # cached for /health
        try:
            yield
        finally:
            if osc_transport is not None:
                osc_transport.close()
            for task in (ndi_input, io_check):
                if task is not None:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
            await sessions.close_all("the server is shutting down")
            await asyncio.to_thread(replays.close)  # cancelled; their threads end at a call's end
            model.close()  # a multi-GPU ring's processes (nothing for one GPU)
            if own_recordings:
                shutil.rmtree(recordings_dir, ignore_errors=True)

    # /docs and /redoc with Swagger UI and ReDoc served from the installed package, not a CDN: the API
    # docs work on a machine without internet (the assets live under /static-offline-docs).
    app = FastAPIOffline(
        title="wanstream",
        version=__version__,
        summary="Real-time video diffusion (StreamDiffusionV2 on Wan2.1): WebRTC streaming and control.",
        lifespan=lifespan,
    )
    app.state.config = config
    app.state.model = model
    app.state.sessions = sessions
    # Tells a client that the server restarted (the studio then asks before replacing its saved work).
    app.state.instance = secrets.token_hex(8)
    app.state.started = time.time()
    app.state.prompt_extender = ExtenderHolder(extender or default_factory(config.models_dir, config.demo))
    app.state.lora_jobs = LoraJobs()
    app.state.replays = replays
    app.state.osc = None  # the OSC endpoint, once listening
    app.state.osc_port = config.osc_port or config.port
    app.state.osc_error = None
    app.include_router(router)
    app.include_router(timeline_router)
    app.include_router(control_router)
    app.include_router(prompts_router)
    app.include_router(loras_router)
    app.include_router(io_router)

    if (STATIC_DIR / "index.html").is_file():
        app.mount("/", StudioFiles(directory=STATIC_DIR, html=True), name="studio")
    else:

        @app.get("/", include_in_schema=False)
        async def placeholder() -> HTMLResponse:
            return HTMLResponse(_PLACEHOLDER)

    # Body limits inside the guard: a request without the token is refused before its body is read.
    app.add_middleware(BodyLimit)
    # Added last = outermost: CORS answers preflights (which carry no token) before the guard runs.
    app.add_middleware(
        RequestGuard, token=config.token, bind_host=config.host, cors_origins=config.cors_origins
    )
    if config.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.cors_origins),
            allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "X-Wanstream-Token"],
        )
    return app
