"""OSC control: a session driven over UDP on 127.0.0.1 (settings, prompts, transitions, pause, reset, the
tempo, a quantised prompt change and server-side timeline playback), and the admission rules of an exposed
server (checked on the protocol object: no packet leaves loopback)."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pythonosc.osc_message import OscMessage
from pythonosc.osc_message_builder import OscMessageBuilder

from server.harness import ServerProcess, free_port
from wanstream.server.osc import MAX_PACKET_BYTES, OscServer


def _packet(address: str, *args: Any) -> bytes:
    builder = OscMessageBuilder(address)
    for arg in args:
        builder.add_arg(arg)
    return builder.build().dgram


class Osc:
    def __init__(self, port: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(30)
        self.target = ("127.0.0.1", port)

    def ask(self, address: str, *args: Any) -> tuple[str, dict[str, Any]]:
        """Send one message; its reply: (reply address, body)."""
        self.sock.sendto(_packet(address, *args), self.target)
        while True:
            data, _ = self.sock.recvfrom(65536)
            reply = OscMessage(data)
            answered, text = reply.params
            if answered == address:
                return reply.address, json.loads(text)


@pytest.fixture
def osc(server: ServerProcess) -> Iterator[Osc]:
    client = Osc(server.port)  # OSC listens on the HTTP port's number by default
    yield client
    client.sock.close()


def _wait(check: Any, what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_session_driven_over_osc(server: ServerProcess, osc: Osc) -> None:
    with server.client() as c:
        sid = c.post("/api/v1/sessions", json={"source": "text", "prompts": ["a forest"]}).json()[
            "session_id"
        ]
        try:
            _drive(c, osc, sid)
        finally:
            c.put("/api/v1/tempo", json={"bpm": 120, "quantize": "off", "quantum": 4})
            c.delete(f"/api/v1/sessions/{sid}")


def _status(c: httpx.Client, sid: str) -> dict[str, Any]:
    return c.get(f"/api/v1/sessions/{sid}").json()


def _drive(c: httpx.Client, osc: Osc, sid: str) -> None:
    kind, body = osc.ask("/wanstream/ping")
    assert kind == "/wanstream/pong" and sid in body["sessions"]

    kind, ack = osc.ask("/wanstream/noise_scale", 0.25)
    assert kind == "/wanstream/ack" and ack["applied"] == ["noise_scale"]
    assert _status(c, sid)["settings"]["noise_scale"] == pytest.approx(0.25)

    # The same validation and message as REST
    kind, error = osc.ask("/wanstream/noise_scale", 2.0)
    rest = c.post(f"/api/v1/sessions/{sid}/control", json={"noise_scale": 2.0})
    assert kind == "/wanstream/error" and rest.status_code == 422
    assert error["error"] == rest.json()["detail"]["error"] and "less than or equal to 1" in error["error"]
    assert _status(c, sid)["settings"]["noise_scale"] == pytest.approx(0.25)  # nothing changed

    # Scope's names, and a whole float for an integer setting (many OSC tools send only floats)
    kind, ack = osc.ask("/scope/seed", 7.0)
    assert kind == "/wanstream/ack" and _status(c, sid)["settings"]["seed"] == 7
    kind, error = osc.ask("/wanstream/seed", 7.5)
    assert kind == "/wanstream/error" and "seed" in error["error"]

    kind, ack = osc.ask("/wanstream/prompt", "a red fox", 3.0, "snow", 1.0)
    assert kind == "/wanstream/ack" and ack["applied"] == ["prompts"]
    prompts = _status(c, sid)["prompts"]
    assert [p[0] for p in prompts] == ["a red fox", "snow"]
    assert prompts[0][1] == pytest.approx(0.75)

    kind, ack = osc.ask("/wanstream/transition", 4, "slerp", "a city at night")
    assert kind == "/wanstream/ack" and ack["applied"] == ["prompts", "transition"]
    kind, error = osc.ask("/wanstream/transition", 4, "cubic", "x")
    assert kind == "/wanstream/error" and "transition.method" in error["error"]

    kind, ack = osc.ask(f"/wanstream/session/{sid}/noise_controller", 1)  # 0/1 for a switch
    assert kind == "/wanstream/ack" and _status(c, sid)["settings"]["noise_controller"] is True

    kind, ack = osc.ask("/wanstream/pause")
    assert kind == "/wanstream/ack" and _status(c, sid)["stats"]["paused"] is True
    kind, ack = osc.ask("/wanstream/resume")
    assert kind == "/wanstream/ack" and _status(c, sid)["stats"]["paused"] is False
    kind, ack = osc.ask("/wanstream/reset")
    assert kind == "/wanstream/ack" and ack["flushed"] is True

    kind, ack = osc.ask("/wanstream/control", json.dumps({"steps": [700, 500], "id": 9}))
    assert kind == "/wanstream/ack" and ack["id"] == 9 and _status(c, sid)["settings"]["steps"] == [700, 500]

    for address, args, words in [
        ("/wanstream/nonsense", [1], "unknown address"),
        ("/elsewhere/prompt", ["x"], "start with /wanstream/"),
        ("/wanstream/session/nope/prompt", ["x"], "no session"),
        ("/wanstream/prompt", [2.0], "a weight follows its text"),
    ]:
        kind, error = osc.ask(address, *args)
        assert kind == "/wanstream/error" and words in error["error"], error

    # The tempo, and a prompt change landing on the next downbeat (its control row says when it was due)
    kind, tempo = osc.ask("/wanstream/tempo/bpm", 240.0)
    assert kind == "/wanstream/tempo" and tempo["bpm"] == 240 and c.get("/api/v1/tempo").json()["bpm"] == 240
    kind, error = osc.ask("/wanstream/tempo/quantize", "sometimes")
    assert kind == "/wanstream/error" and "quantize" in error["error"]
    kind, ack = osc.ask("/wanstream/prompt/bar", "on the one")
    assert kind == "/wanstream/ack"
    row = next(
        e for e in c.get(f"/api/v1/sessions/{sid}/events").json() if e.get("id") is None and "due" in e
    )
    assert row["next_chunk"] == ack["next_chunk"] and row["due"] <= row["chunk_start"] + 0.5

    # A timeline the server plays: play, seek and stop over OSC
    timeline = {
        "segments": [
            {"start": 0, "end": 0.3, "prompts": [{"text": "one", "weight": 1}]},
            {"start": 0.3, "end": None, "prompts": [{"text": "two", "weight": 1}]},
        ]
    }
    kind, error = osc.ask("/wanstream/timeline/play")
    assert kind == "/wanstream/error" and "no timeline" in error["error"]
    assert c.put(f"/api/v1/sessions/{sid}/timeline", json=timeline).status_code == 200
    kind, status = osc.ask("/wanstream/timeline/play")
    assert kind == "/wanstream/timeline" and status["playing"] is True
    _wait(lambda: _status(c, sid)["prompts"][0][0] == "two", "the second segment")
    kind, status = osc.ask("/wanstream/timeline/seek", 0.0)
    assert status["position"] < 0.3
    kind, status = osc.ask("/wanstream/timeline/stop")
    assert status["playing"] is False
    assert c.get(f"/api/v1/sessions/{sid}/timeline").json()["sent"] >= 2

    info = c.get("/api/v1/osc").json()
    assert info["enabled"] and info["auth"] == "loopback" and "noise_scale" in info["settings"]
    assert info["stats"]["errors"] >= 5


# ----------------------------------------------------------------------------------------------------
# Admission and limits, on the protocol object (addresses are only labels here: nothing is sent)


class _Transport:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, tuple[str, int]]] = []

    def sendto(self, data: bytes, addr: tuple[str, int]) -> None:
        self.sent.append((data, addr))

    def is_closing(self) -> bool:
        return False


class _Manager:
    sessions: dict[str, Any] = {}  # noqa: RUF012


def _server(**kwargs: Any) -> tuple[OscServer, _Transport]:
    server = OscServer(_Manager(), **kwargs)  # type: ignore[arg-type]
    transport = _Transport()
    server.connection_made(transport)  # type: ignore[arg-type]
    return server, transport


def test_an_exposed_server_needs_the_token_or_an_allowed_sender() -> None:
    server, transport = _server(token="sesame", allow=frozenset({"10.0.0.5"}), exposed=True)
    stranger, friend = ("192.0.2.1", 9000), ("10.0.0.5", 9000)
    server.datagram_received(_packet("/wanstream/ping"), stranger)
    server.datagram_received(_packet("/wanstream/ping", "wrong"), stranger)
    server.datagram_received(b"x" * (MAX_PACKET_BYTES + 1), stranger)
    server.datagram_received(b"garbage", stranger)
    assert transport.sent == [] and server.stats.refused == 4  # dropped without a word (no reflection)
    server.datagram_received(_packet("/wanstream/ping", "sesame"), stranger)
    server.datagram_received(_packet("/wanstream/ping"), friend)
    mapped = ("::ffff:10.0.0.5", 9000)  # the same sender through a dual-stack socket
    server.datagram_received(_packet("/wanstream/ping"), mapped)
    assert [OscMessage(d).address for d, _ in transport.sent] == ["/wanstream/pong"] * 3
    assert [a for _, a in transport.sent] == [stranger, friend, mapped]


def test_oversized_and_malformed_packets_are_refused_before_parsing() -> None:
    server, transport = _server()
    server.datagram_received(b"\0" * (MAX_PACKET_BYTES + 1), ("127.0.0.1", 9000))
    server.datagram_received(b"garbage", ("127.0.0.1", 9000))
    server.datagram_received(_packet("/wanstream/prompt", "x"), ("127.0.0.1", 9000))  # no session running
    replies = [OscMessage(d) for d, _ in transport.sent]
    assert [r.address for r in replies] == ["/wanstream/error"] * 3
    texts = [json.loads(r.params[1])["error"] for r in replies]
    assert "too large" in texts[0] and "not an OSC packet" in texts[1] and "no stream is running" in texts[2]


def test_serve_flags_choose_the_osc_port_or_switch_it_off(tmp_path: Path) -> None:
    port = free_port()
    server = ServerProcess("--demo", "--no-preload", "--osc-port", str(port), log_path=tmp_path / "osc.log")
    try:
        server.wait_ready(model=False)
        info = httpx.get(f"{server.url}/api/v1/osc", timeout=10).json()
        assert info["enabled"] and info["port"] == port and info["auth"] == "loopback"
        client = Osc(port)
        try:
            kind, body = client.ask("/wanstream/ping")
        finally:
            client.sock.close()
        assert kind == "/wanstream/pong" and body["sessions"] == []
    finally:
        assert server.stop() == 0, server.log()
    off = ServerProcess("--demo", "--no-preload", "--no-osc", log_path=tmp_path / "no-osc.log")
    try:
        off.wait_ready(model=False)
        assert httpx.get(f"{off.url}/api/v1/osc", timeout=10).json()["enabled"] is False
    finally:
        assert off.stop() == 0, off.log()


def test_tempo_and_timeline_routes_refuse_bad_values(server: ServerProcess) -> None:
    with server.client() as c:
        try:
            assert c.put("/api/v1/tempo", json={"bpm": 5}).status_code == 422
            assert c.put("/api/v1/tempo", json={"quantize": "sometimes"}).status_code == 422
            assert c.put("/api/v1/tempo", json={"tempo": 120}).status_code == 422  # unknown field
            assert c.get("/api/v1/tempo").json()["bpm"] == 120  # nothing changed
            before = c.get("/api/v1/tempo").json()["beat"]
            assert c.post("/api/v1/tempo/downbeat").json()["beat"] < max(before, 0.5)
            assert c.post("/api/v1/tempo/tap").status_code == 200
        finally:
            c.put("/api/v1/tempo", json={"bpm": 120, "quantize": "off", "quantum": 4})
        sid = c.post("/api/v1/sessions", json={"source": "text", "prompts": ["a"]}).json()["session_id"]
        try:
            assert c.get(f"/api/v1/sessions/{sid}/timeline").status_code == 404
            assert c.post(f"/api/v1/sessions/{sid}/timeline/play").status_code == 404
            bad = {
                "segments": [
                    {"start": 0, "end": 2, "prompts": [{"text": "a", "weight": 1}]},
                    {"start": 1, "end": 3, "prompts": [{"text": "b", "weight": 1}]},
                ]
            }
            r = c.put(f"/api/v1/sessions/{sid}/timeline", json=bad)
            assert r.status_code == 422 and "overlaps" in r.text
            good = {"segments": [{"start": 0, "end": None, "prompts": [{"text": "a", "weight": 1}]}]}
            assert c.put(f"/api/v1/sessions/{sid}/timeline", json=good).json()["duration"] is None
            assert c.post(f"/api/v1/sessions/{sid}/timeline/seek", params={"t": -1}).status_code == 422
            assert c.put("/api/v1/sessions/nope/timeline", json=good).status_code == 404
        finally:
            c.delete(f"/api/v1/sessions/{sid}")
