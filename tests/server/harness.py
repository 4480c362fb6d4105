"""Test harness: a real `wanstream serve` in a subprocess, and the checks the server tests share.

A subprocess keeps the server's threads, tasks, memory and file handles apart from the test client's, so
the leak checks read the server's own numbers (GET /api/v1/debug/resources).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

TOKEN = "test-token-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, *args: str, log_path: Path, token: str | None = None, host: str = "127.0.0.1") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.token = token
        self.log_path = log_path
        cmd = [
            sys.executable,
            "-m",
            "wanstream.cli.main",
            "serve",
            "--host",
            host,
            "--port",
            str(self.port),
            *args,
        ]
        if token:
            cmd += ["--token", token]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self._log = open(log_path, "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def client(self, **kwargs: object) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=30, **kwargs)

    def async_client(self, **kwargs: object) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, headers=self.headers, timeout=30, **kwargs)

    def wait_ready(self, timeout: float = 60.0, model: bool = True) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}):\n{self.log()}")
            with contextlib.suppress(httpx.HTTPError):
                health = httpx.get(f"{self.url}/health", headers=self.headers, timeout=2).json()
                if not model or health["model"] == "loaded":
                    return
                if health["model"] == "error":
                    raise RuntimeError(f"the model failed to load:\n{self.log()}")
            time.sleep(0.1)
        raise TimeoutError(f"the server did not become ready:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text()[-4000:]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode


@contextlib.contextmanager
def serving(*args: str, log_path: Path) -> Iterator[ServerProcess]:
    """A `wanstream serve` with these arguments, ready (model loaded) inside the block, and shut down at its
    end, which must be clean (exit status 0)."""
    server = ServerProcess(*args, log_path=log_path)
    try:
        server.wait_ready()
        yield server
    finally:
        code = server.stop()
        assert code == 0, f"the server did not shut down cleanly ({code}):\n{server.log()}"


def wait_idle(server: ServerProcess, timeout: float = 20.0) -> None:
    """Until the server runs no stream (one a test just stopped may still be closing)."""
    deadline = time.monotonic() + timeout
    with server.client() as c:
        while sessions := c.get("/api/v1/sessions").json():
            assert time.monotonic() < deadline, f"streams left running: {sessions}"
            time.sleep(0.1)


RSS_SLACK = 64 * 1024 * 1024  # allocator noise; a leaked session (caches, frames) is far bigger per cycle


def resources(c: httpx.Client) -> dict[str, Any]:
    return c.get("/api/v1/debug/resources").json()


def settled_resources(c: httpx.Client, baseline: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """The server's resources once they are back to `baseline` (or whatever they are at the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        now = resources(c)
        if leaks(baseline, now) == [] or time.monotonic() > deadline:
            return now
        time.sleep(0.2)


def leaks(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    found = []
    extra = sorted(set(after["wanstream_threads"]) - set(before["wanstream_threads"]))
    if extra:
        found.append(f"threads left: {extra}")
    if after["threads"] > before["threads"]:
        found.append(f"threads {before['threads']} -> {after['threads']}")
    if after["executor_threads"] > after["executor_limit"]:
        found.append(f"executor threads {after['executor_threads']} > {after['executor_limit']}")
    if after["tasks"] > before["tasks"]:
        found.append(f"asyncio tasks {before['tasks']} -> {after['tasks']}")
    if after["open_fds"] > before["open_fds"]:
        found.append(f"open files {before['open_fds']} -> {after['open_fds']}")
    if after["rss_bytes"] - before["rss_bytes"] > RSS_SLACK:
        found.append(f"memory {before['rss_bytes'] >> 20} MiB -> {after['rss_bytes'] >> 20} MiB")
    return found


async def wait_for(predicate: Any, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def wait_sessions(c: httpx.AsyncClient, count: int, timeout: float = 20.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        sessions = (await c.get("/api/v1/sessions")).json()
        if len(sessions) == count:
            return sessions
        assert time.monotonic() < deadline, f"expected {count} sessions, have {sessions}"
        await asyncio.sleep(0.05)


def describe(r: dict[str, Any]) -> str:
    """One line of resource figures (for the reliability report: run the tests with -s)."""
    return (
        f"threads {r['threads']} (+{r['executor_threads']} executor), tasks {r['tasks']}, "
        f"open files {r['open_fds']}, RSS {r['rss_bytes'] / 2**20:.0f} MiB"
    )


class InProcessServer:
    """The app under uvicorn on a thread of this process (with the server's own HTTP options), for tests
    that must look inside it: `app.state.sessions` and its workers, `threading.enumerate()`."""

    def __init__(self, app: Any) -> None:
        import threading

        import uvicorn

        from wanstream.server.http import uvicorn_options

        self.app = app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", **uvicorn_options()
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="test-uvicorn", daemon=True)

    def __enter__(self) -> InProcessServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(60)

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kwargs)
