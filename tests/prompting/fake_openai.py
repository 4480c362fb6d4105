"""A loopback stand-in for an OpenAI-compatible chat completions endpoint (127.0.0.1 only).

`POST /v1/chat/completions` with `stream: true` answers server-sent events, one `choices[0].delta.content`
piece per word of the next scripted answer, then `data: [DONE]`. Every request body and its headers are
recorded. `key` (when set) must come as `Authorization: Bearer <key>`, else 401. `hold` makes the server
wait (before answering) until the event is set, to test the client's timeout.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class FakeOpenAI:
    def __init__(self, answers: list[str], key: str | None = None) -> None:
        self.answers = list(answers)
        self.key = key
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.hold: threading.Event | None = None
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def __enter__(self) -> FakeOpenAI:
        fake = self

        class Handler(_Handler):
            server_state = fake

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.hold is not None:
            self.hold.set()
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_state: FakeOpenAI
    timeout = 30

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        fake = self.server_state
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
        fake.requests.append(body)
        fake.headers.append({k.lower(): v for k, v in self.headers.items()})
        if self.path != "/v1/chat/completions":
            return self._plain(404, b'{"error": "not found"}')
        if fake.key is not None and self.headers.get("Authorization") != f"Bearer {fake.key}":
            return self._plain(401, b'{"error": {"message": "Incorrect API key provided"}}')
        if fake.hold is not None:
            fake.hold.wait(30)
        answer = fake.answers.pop(0) if fake.answers else ""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        for i, word in enumerate(answer.split(" ")):
            chunk = {"choices": [{"index": 0, "delta": {"content": (" " if i else "") + word}}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()
        self.close_connection = True

    def _plain(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
