"""`serve --random-weights`: random networks in the server, labelled everywhere (first line, /health, the
model status the studio shows); and the memory estimate refusing a stream before it starts."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from server.harness import InProcessServer, ServerProcess

SMALL = {"height": 64, "width": 64}


def _wait(condition, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_the_first_line_and_health_say_random_weights(tmp_path: Path) -> None:
    server = ServerProcess("--random-weights", "--no-preload", "--device", "cpu", log_path=tmp_path / "log")
    try:
        server.wait_ready(model=False)
        assert server.client().get("/health").json()["random_weights"] is True
    finally:
        server.stop()
    first = server.log_path.read_text().splitlines()[0]
    assert "RANDOM WEIGHTS" in first and "--random-weights" in first


def test_random_weights_server_streams_and_refuses_what_would_not_fit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from wanstream.engine import estimate
    from wanstream.server import ServerConfig, create_app
    from wanstream.server import api as server_api
    from wanstream.server.model import ModelManager

    threads = torch.get_num_threads()  # the server leaves a core to the media path: restore it after
    config = ServerConfig(random_weights=True, device="cpu", precision="fp8")
    model = ModelManager(
        demo=False, models_dir=None, device="cpu", random_weights=True, precision="fp8", random_size="tiny"
    )
    try:
        with InProcessServer(create_app(config, model=model)) as server, server.client() as c:
            _wait(lambda: c.get("/health").json()["model"] == "loaded")
            health = c.get("/health").json()
            assert health["random_weights"] is True and health["demo"] is False
            status = c.get("/api/v1/model").json()
            assert status["random_weights"] is True and "RANDOM WEIGHTS" in status["label"]
            assert (status["precision"], status["text_encoder"]) == ("fp8", "gpu")
            body = {"source": "text", "settings": SMALL, "prompts": ["a fox in the snow"]}
            response = c.post("/api/v1/sessions", json=body)
            assert response.status_code == 201, response.text
            sid = response.json()["session_id"]
            session = server.app.state.sessions.sessions[sid]
            _wait(lambda: session.worker.stats().chunks >= 1)
            assert c.delete(f"/api/v1/sessions/{sid}").status_code == 204

            # A (fake) GPU with a measured row and almost no free memory: refused before anything starts.
            row = estimate.Row(
                gpu="Fake GPU", height=64, width=64, steps=2, codecs="wan", batching="stream",
                precision="fp8", text_encoder="gpu", peak_gib=4.0, models_gib=1.0, fps=30.0,
            )  # fmt: skip
            real = estimate.preflight
            monkeypatch.setattr(
                server_api,
                "preflight",
                lambda comp, s, **kw: real(comp, s, rows=[row], gpu="Fake GPU", free_bytes=2**20),
            )
            _wait(lambda: not server.app.state.sessions.sessions)
            response = c.post("/api/v1/sessions", json=body)
            assert response.status_code == 422
            detail = response.json()["detail"]
            assert "would not fit" in detail and "estimate" in detail and "fewer denoising steps" in detail
            assert not server.app.state.sessions.sessions
    finally:
        torch.set_num_threads(threads)


def test_random_weights_is_one_device_only() -> None:
    from wanstream.cli.main import main

    assert main(["serve", "--random-weights", "--demo"]) == 2
    assert main(["serve", "--random-weights", "--gpus", "2", "--device", "cpu"]) == 2


def test_a_load_request_chooses_the_dit_precision_and_a_wrong_one_changes_nothing() -> None:
    """The studio's "DiT precision" selector: POST /model/load {"precision": ...} reloads the networks so."""
    from wanstream.models.fp8 import Fp8Linear
    from wanstream.server import ServerConfig, create_app
    from wanstream.server.model import ModelManager

    threads = torch.get_num_threads()
    config = ServerConfig(random_weights=True, device="cpu")
    model = ModelManager(demo=False, models_dir=None, device="cpu", random_weights=True, random_size="tiny")
    try:
        with InProcessServer(create_app(config, model=model)) as server, server.client() as c:
            _wait(lambda: c.get("/api/v1/model").json()["state"] == "loaded")
            assert c.get("/api/v1/model").json()["precision"] == "bf16"
            bad = c.post("/api/v1/model/load", json={"precision": "fp4"})
            assert bad.status_code == 422 and "precision" in bad.text
            assert c.get("/api/v1/model").json()["state"] == "loaded"  # nothing reloaded
            assert c.post("/api/v1/model/load", json={"precision": "fp8"}).status_code == 202
            _wait(lambda: c.get("/api/v1/model").json()["state"] == "loaded")
            assert c.get("/api/v1/model").json()["precision"] == "fp8"
            dit = model.pipeline.components.dit  # type: ignore[union-attr]
            assert any(isinstance(m, Fp8Linear) for m in dit.modules())
            # The next load without a precision keeps the last one chosen.
            assert c.post("/api/v1/model/load", json={}).status_code == 202
            _wait(lambda: c.get("/api/v1/model").json()["state"] == "loaded")
            assert c.get("/api/v1/model").json()["precision"] == "fp8"
    finally:
        torch.set_num_threads(threads)


def test_before_a_load_the_status_says_which_precision_the_next_load_uses() -> None:
    """The studio's selector starts from it: a server started with --precision fp8 (or --low-vram) that has
    not loaded yet must not show bf16, or the first Load weights would undo the server's choice."""
    from wanstream.server.model import ModelManager

    model = ModelManager(demo=False, models_dir=None, device="cpu", precision="fp8")
    status = model.status()
    assert (status.state, status.precision) == ("not_loaded", "fp8")
