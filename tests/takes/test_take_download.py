"""`GET /api/v1/sessions/{id}/log` over a real HTTP connection (uvicorn on 127.0.0.1, in this process): the log
is written as it is sent, nothing is left on disk, the bytes are the file `save_log` writes, two downloads at once
are both whole, a client that goes away mid-download stops the writer, and a take that cannot be read mid-way
breaks the download off.

The take is made here rather than streamed (its calls recorded into a server `Take` and kept as an ended
stream's): a large frame argument, and a client with a small receive buffer, make the body far bigger than the
sockets' buffers, so the writer is waiting on its full queue when the client leaves. A streamed take replaying bit for bit through the
same route is `test_take_through_server.py`.
"""

from __future__ import annotations

import io
import json
import socket
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from server.harness import InProcessServer
from wanstream.engine.settings import StreamSettings
from wanstream.server import takes
from wanstream.server.takes import Take
from wanstream.takes import load_log, save_log

SID = "download-take"
WRITER = f"wanstream-take-download-{SID}"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[InProcessServer, Take]]:
    from wanstream.server import ServerConfig, create_app

    threads = torch.get_num_threads()  # the server leaves a core to the media path: restore it after
    app = create_app(ServerConfig(demo=True, recordings_dir=tmp_path_factory.mktemp("download-recordings")))
    try:
        with InProcessServer(app) as server:
            assert app.state.model.wait(60).state == "loaded"
            manager = app.state.sessions
            take = Take.open(
                SID, manager.takes_dir / SID, StreamSettings(height=48, width=64), limit_mib=1024
            )
            rng = np.random.default_rng(7)
            video = torch.from_numpy(rng.integers(0, 256, (3, 48, 64, 3), dtype=np.uint8))
            noise = torch.from_numpy(rng.standard_normal((4, 1024, 1024), dtype=np.float32))  # 16 MiB
            take.journal.record("session", "push", {"frames": video}, torch.zeros(4, 48, 64, 3))
            take.journal.record("session", "push", {"frames": noise}, None)
            take.journal.record("session", "push", {"frames": video[:1]}, torch.zeros(4, 48, 64, 3))
            for index in range(8):
                take.journal.note_output(index, np.full((48, 64, 3), index, np.uint8))
            take.finish()  # an ended stream's take: its frames are on disk
            manager.finished_takes[SID] = take
            yield server, take
    finally:
        torch.set_num_threads(threads)


def writers() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name == WRITER]


def wait_no_writer(timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while writers():
        assert time.monotonic() < deadline, "the download's writer thread is still running"
        time.sleep(0.02)


def entries(data: bytes) -> dict[str, Any]:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        out: dict[str, Any] = {name: z.read(name) for name in z.namelist()}
    header = json.loads(out["log.json"])
    header.pop("created")  # the time it was written: seconds apart
    out["log.json"] = header
    return out


def test_the_download_is_the_file_save_log_writes_and_nothing_is_left_on_disk(
    served: tuple[InProcessServer, Take], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server, take = served
    monkeypatch.setattr(takes, "STREAM_CHUNK_BYTES", 64 * 1024)  # many pieces, the writer often waiting
    monkeypatch.setattr(takes, "STREAM_QUEUE_CHUNKS", 2)
    got: dict[int, httpx.Response] = {}

    def download(i: int) -> None:
        with server.client() as c:
            got[i] = c.get(f"/api/v1/sessions/{SID}/log")

    both = [threading.Thread(target=download, args=(i,)) for i in range(2)]  # two at once: both whole
    for t in both:
        t.start()
    for t in both:
        t.join(60)
    # The reference is written with the server's torch threads: part of the model's identity, and per thread.
    served_threads = entries(got[0].content)["log.json"]["model"]["cpu_threads"]
    threads = torch.get_num_threads()
    torch.set_num_threads(served_threads)
    try:
        components = server.app.state.model.pipeline.components
        reference = save_log(take.journal, tmp_path / "reference.wslog", components)
    finally:
        torch.set_num_threads(threads)
    expected = entries(reference.read_bytes())
    assert sorted(expected) == ["frames/000000.mkv", "frames/000001.npy", "frames/000002.mkv", "log.json"]
    for response in got.values():
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/zip"
        assert response.headers["content-disposition"] == f'attachment; filename="wanstream-{SID}.wslog"'
        assert len(response.content) > 16 * 2**20
        assert entries(response.content) == expected
        path = tmp_path / "take.wslog"
        path.write_bytes(response.content)
        with load_log(path) as log:
            assert [op.name for op in log.ops] == ["push"] * 3 and len(log.digests) == 8
            for key in range(3):
                assert torch.equal(log.frames(key), take.store.get(key))
    assert sorted(p.name for p in take.folder.iterdir()) == ["frames"]  # no .wslog, no .part: nothing written
    with server.client() as c:
        documented = c.get("/openapi.json").json()["paths"]["/api/v1/sessions/{session_id}/log"]["get"]
    assert "application/zip" in documented["responses"]["200"]["content"]
    wait_no_writer()


def test_a_client_gone_mid_download_stops_the_writer(
    served: tuple[InProcessServer, Take], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, _ = served
    monkeypatch.setattr(takes, "STREAM_CHUNK_BYTES", 16 * 1024)
    monkeypatch.setattr(takes, "STREAM_QUEUE_CHUNKS", 2)
    pipes: list[Any] = []
    made = takes._Pipe.__init__

    def keep(self: Any, *args: Any) -> None:
        made(self, *args)
        pipes.append(self)

    monkeypatch.setattr(takes._Pipe, "__init__", keep)
    # A small receive buffer (no autotuning): the body cannot all wait in the sockets, the writer must wait.
    small = httpx.HTTPTransport(socket_options=[(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)])
    with server.client(transport=small) as c, c.stream("GET", f"/api/v1/sessions/{SID}/log") as response:
        assert response.status_code == 200
        body = response.iter_raw()  # kept: a dropped iterator closes the response
        assert next(body).startswith(b"PK\x03\x04")
        deadline = time.monotonic() + 10
        while not (pipes and pipes[0].queue.full()):  # the sockets' buffers are full: the writer waits
            assert time.monotonic() < deadline, "the writer never waited for the client"
            time.sleep(0.02)
        assert writers()
    # Leaving the block closes the connection with most of the body unread.
    wait_no_writer()
    assert pipes[0].cancelled.is_set()


def test_a_take_unreadable_mid_way_breaks_the_download_off(
    served: tuple[InProcessServer, Take], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    server, take = served
    monkeypatch.setattr(takes, "STREAM_CHUNK_BYTES", 16 * 1024)
    found = take.store.path

    def path(key: int, timeout: float = 60.0) -> Path:
        if key == 2:
            raise FileNotFoundError("frames/000002.mkv was removed")
        return found(key, timeout)

    monkeypatch.setattr(take.store, "path", path)
    with server.client() as c, pytest.raises(httpx.RemoteProtocolError):
        c.get(f"/api/v1/sessions/{SID}/log")  # the headers went out first: the body is cut off
    wait_no_writer()
    assert any("cut off mid-download" in r.getMessage() for r in caplog.records), caplog.text
