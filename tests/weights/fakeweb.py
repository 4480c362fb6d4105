"""A loopback web server for LoRA downloads: plain file links and CivitAI's public API (127.0.0.1 only).

* `GET /files/<name>` — the bytes of `files[name]`, with `Accept-Ranges`, an `ETag` (the content's SHA-256),
  and `Range: bytes=N-` → 206 (unless `If-Range` names another ETag: then the whole file, 200);
  `cut_once` names files whose next body stops half-way (the connection is shut), after which
  `fail_after_cut` makes their GETs answer 500; `ignore_range` answers ranges with the whole file;
  `disposition[name]` adds a `Content-Disposition` file name; `hold` (an Event) delays every file until set.
* `GET /api/v1/model-versions/<id>` — `versions[id]` as JSON (CivitAI's model-version record).
* `GET /api/download/models/<id>` — 302 to `/files/<versions[id]["files"][0]["name"]>`; with `token` set, a
  request without `Authorization: Bearer <token>` gets 401.

Every request is logged in `requests` as (method, path, headers).
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import quote, unquote


class FakeWeb:
    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.versions: dict[str, dict[str, Any]] = {}
        self.disposition: dict[str, str] = {}
        self.cut_once: set[str] = set()
        self.fail_after_cut = False
        self.hold: threading.Event | None = None  # file bodies wait for it (a download in progress)
        self._cut_done: set[str] = set()
        self.ignore_range = False
        self.token: str | None = None
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def file_url(self, name: str) -> str:
        return f"{self.url}/files/{quote(name)}"

    def gets(self, name: str) -> list[dict[str, str]]:
        return [h for m, p, h in self.requests if m == "GET" and unquote(p) == f"/files/{name}"]

    def __enter__(self) -> FakeWeb:
        web = self

        class Handler(_Handler):
            fake = web

        self._server = _QuietServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.hold is not None:
            self.hold.set()
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that hangs up early (a refused download) is expected here


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    fake: FakeWeb
    timeout = 10

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        fake = self.fake
        fake.requests.append(("GET", self.path, {k.lower(): v for k, v in self.headers.items()}))
        path = self.path.split("?", 1)[0]
        if m := re.fullmatch(r"/files/(.+)", path):
            return self._file(unquote(m.group(1)))
        if m := re.fullmatch(r"/api/v1/model-versions/(\d+)", path):
            version = fake.versions.get(m.group(1))
            if version is None:
                return self._send(404, b'{"error": "No model version with id"}', {})
            return self._send(200, json.dumps(version).encode(), {"Content-Type": "application/json"})
        if m := re.fullmatch(r"/api/download/models/(\d+)", path):
            version = fake.versions.get(m.group(1))
            if version is None:
                return self._send(404, b"not found", {})
            if fake.token is not None and self.headers.get("Authorization") != f"Bearer {fake.token}":
                return self._send(401, b'{"error": "Unauthorized"}', {})
            target = version["files"][0]["name"]
            return self._send(302, b"", {"Location": f"/files/{quote(target)}"})
        self._send(404, b"no such route", {})

    def _file(self, name: str) -> None:
        fake = self.fake
        content = fake.files.get(name)
        if content is None:
            return self._send(404, b"no such file", {})
        if fake.hold is not None:
            fake.hold.wait(30)
        if fake.fail_after_cut and name in fake._cut_done:
            return self._send(500, b"Internal Error", {})
        etag = '"' + hashlib.sha256(content).hexdigest() + '"'
        headers = {"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream", "ETag": etag}
        if name in fake.disposition:
            headers["Content-Disposition"] = f'attachment; filename="{fake.disposition[name]}"'
        start, status = 0, 200
        if_range = self.headers.get("If-Range")
        if (rng := self.headers.get("Range")) and not fake.ignore_range and if_range in (None, etag):
            m = re.fullmatch(r"bytes=(\d+)-", rng.strip())
            if not m or int(m.group(1)) >= len(content):
                return self._send(416, b"", {"Content-Range": f"bytes */{len(content)}"})
            start, status = int(m.group(1)), 206
            headers["Content-Range"] = f"bytes {start}-{len(content) - 1}/{len(content)}"
        body = content[start:]
        if name in fake.cut_once and len(body) > 1:
            fake.cut_once.discard(name)
            fake._cut_done.add(name)
            self.send_response(status)
            for k, v in {**headers, "Content-Length": str(len(body))}.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self._send(status, body, headers)

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
