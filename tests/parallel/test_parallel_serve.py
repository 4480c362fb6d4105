"""`wanstream serve --gpus 2 --device cpu`: a real server whose engine is a 2-process ring."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from server.harness import ServerProcess


def test_a_server_streams_from_a_ring_and_stops_its_processes(tmp_path: Path) -> None:
    server = ServerProcess("--demo", "--gpus", "2", "--device", "cpu", log_path=tmp_path / "serve.log")
    try:
        server.wait_ready(timeout=90)
        workers = _descendants(server.proc.pid)
        assert workers, "the ring's rank 1 runs in a child process"
        with server.client() as c:
            model = c.get("/api/v1/model").json()
            assert "2-rank ring (cpu)" in model["label"]
            sid = c.post("/api/v1/sessions", json={"source": "text", "prompts": ["a forest at dawn"]}).json()[
                "session_id"
            ]
            deadline = time.monotonic() + 30
            while c.get(f"/api/v1/sessions/{sid}").json()["stats"]["frames_made"] < 9:
                assert time.monotonic() < deadline, f"no frames from the ring:\n{server.log()}"
                time.sleep(0.1)
            assert c.delete(f"/api/v1/sessions/{sid}").status_code == 204

            # A rank dies between streams: the next stream fails with its name, the model reports the
            # ring down (new streams are refused with the reason), and reloading starts a new ring.
            ranks = [pid for pid in _descendants(server.proc.pid) if _parent(pid) != server.proc.pid]
            assert ranks, "rank 1 runs under the server's fork server"
            os.kill(ranks[0], signal.SIGKILL)
            c.post("/api/v1/sessions", json={"source": "text", "prompts": ["x"]})
            deadline = time.monotonic() + 30
            while (model := c.get("/api/v1/model").json())["state"] != "error":
                assert time.monotonic() < deadline, f"the ring failure was not reported:\n{server.log()}"
                time.sleep(0.1)
            assert "ring is down" in model["error"] and "rank 1" in model["error"]
            refused = c.post("/api/v1/sessions", json={"source": "text", "prompts": ["x"]})
            assert refused.status_code == 503 and "ring is down" in refused.text
            while c.get("/api/v1/sessions").json():  # the failed stream closes itself
                assert time.monotonic() < deadline
                time.sleep(0.1)
            assert c.post("/api/v1/model/load", json={"demo": True}).status_code == 202
            server.wait_ready(timeout=60)
            sid = c.post("/api/v1/sessions", json={"source": "text", "prompts": ["x"]}).json()["session_id"]
            while c.get(f"/api/v1/sessions/{sid}").json()["stats"]["frames_made"] < 5:
                assert time.monotonic() < deadline + 60, f"no frames from the new ring:\n{server.log()}"
                time.sleep(0.1)
            assert c.delete(f"/api/v1/sessions/{sid}").status_code == 204
            workers = _descendants(server.proc.pid)
    finally:
        code = server.stop()
    assert code == 0, server.log()
    deadline = time.monotonic() + 10
    while any(_running(pid) for pid in workers):
        assert time.monotonic() < deadline, "ring processes outlived the server"
        time.sleep(0.1)


def test_serve_refuses_gpus_it_cannot_use(capsys) -> None:
    from wanstream.cli.main import main

    assert main(["serve", "--demo", "--gpus", "2", "--max-sessions", "2", "--device", "cpu"]) == 2
    assert "--max-sessions 1" in capsys.readouterr().err
    import torch

    if torch.cuda.device_count() < 64:
        assert main(["serve", "--demo", "--gpus", "64"]) == 2
        err = capsys.readouterr().err
        assert "CUDA GPU(s)" in err and "--device cpu" in err


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _parent(pid: int) -> int | None:
    stat = _stat(pid)
    return None if stat is None else int(stat[1])


def _running(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z"


def _descendants(root: int) -> list[int]:
    """Process ids below `root` (Linux /proc): the ring's processes sit under the server's fork server."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            parents[int(entry.name)] = int(stat[1])
    found, frontier = [], [root]
    while frontier:
        pid = frontier.pop()
        children = [child for child, parent in parents.items() if parent == pid]
        found += children
        frontier += children
    return found


pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
