"""Out of memory in one stream ends that stream only: its client is told why (what to lower), its slot and
memory are freed, and the next stream on the same server starts without a restart. (On the GPU,
tools/gpu/oom_check.py forces a real CUDA OOM; here the engine's step raises the error torch raises.)"""

from __future__ import annotations

import time

import torch

from server.harness import InProcessServer

PROMPT = "a stained glass window of a forest"
SMALL = {"height": 64, "width": 64}


def _wait(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_out_of_memory_ends_only_that_stream_and_the_next_starts() -> None:
    from wanstream.server import ServerConfig, create_app

    with InProcessServer(create_app(ServerConfig(demo=True, max_sessions=2))) as server, server.client() as c:
        _wait(lambda: c.get("/health").json()["model"] == "loaded")
        manager = server.app.state.sessions
        ids = []
        for _ in range(2):
            response = c.post(
                "/api/v1/sessions", json={"source": "text", "settings": SMALL, "prompts": [PROMPT]}
            )
            assert response.status_code == 201, response.text
            ids.append(response.json()["session_id"])
        victim, bystander = (manager.sessions[i] for i in ids)
        _wait(lambda: victim.worker.stats().chunks >= 1 and bystander.worker.stats().chunks >= 1)

        def out_of_memory(*args, **kwargs):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB. GPU 0 has ...")

        victim.worker.session.denoiser._step = out_of_memory  # its next chunk runs out
        _wait(lambda: ids[0] not in manager.sessions)
        assert victim.close_reason.startswith("engine error: StreamOutOfMemory: out of GPU memory at 64x64")
        assert "3.00 GiB" in victim.close_reason and "smaller size" in victim.close_reason
        assert victim.worker.session is None and victim.worker.join(5)  # its memory went with its thread

        chunks = bystander.worker.stats().chunks
        _wait(lambda: bystander.worker.stats().chunks > chunks + 2)  # the other stream never stopped
        response = c.post("/api/v1/sessions", json={"source": "text", "settings": SMALL, "prompts": [PROMPT]})
        assert response.status_code == 201, response.text  # the freed slot takes a new stream at once
        fresh = manager.sessions[response.json()["session_id"]]
        _wait(lambda: fresh.worker.stats().chunks >= 1)
        metrics = c.get("/metrics").text
        assert 'wanstream_sessions_ended_total{outcome="error"} 1' in metrics
        for sid in (ids[1], response.json()["session_id"]):
            assert c.delete(f"/api/v1/sessions/{sid}").status_code == 204
