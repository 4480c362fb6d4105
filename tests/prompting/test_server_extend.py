"""`POST /api/v1/prompts/extend`: the tiny local model through the server; size limits, 503/504/409, and the
event loop stays free while a model runs."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from wanstream.engine.random_weights import demo_tokenizer
from wanstream.models.text import PromptTokenizer
from wanstream.prompting.backends import build_extender
from wanstream.prompting.extend import ExtendCancelled, ExtendTimeout, PromptExtender, umt5_counter

DOG = "a cartoon dog jumping and then running"


@contextmanager
def client_for(extender=None, **config) -> Iterator[httpx.Client]:
    from starlette.testclient import TestClient

    from wanstream.server import ServerConfig, create_app

    app = create_app(ServerConfig(demo=True, preload=False, **config), extender=extender)
    with TestClient(app, base_url="http://127.0.0.1:8000") as c:
        yield c


class GatedBackend:
    """Answers only once `release` is set; honours the deadline and cancel like a real backend."""

    name = "gated"

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()

    def complete(self, messages, *, seed, max_new_tokens, deadline, cancel) -> str:
        self.started.set()
        while not self.release.wait(0.01):
            if cancel.is_set():
                raise ExtendCancelled("cancelled")
            if time.monotonic() >= deadline:
                raise ExtendTimeout("out of time")
        return "A dog runs across a sunny lawn, tracking shot."


@pytest.fixture
def tiny_client(models_dir: Path) -> Iterator[httpx.Client]:
    def factory() -> PromptExtender:
        return build_extender(
            models_dir=models_dir, tokenizer=PromptTokenizer(demo_tokenizer()), cache=models_dir / "c"
        )

    with client_for(factory) as c:
        yield c


def test_extend_runs_the_local_model_and_caches(tiny_client: httpx.Client) -> None:
    first = tiny_client.post("/api/v1/prompts/extend", json={"text": DOG, "seed": 2})
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["prompt"] == DOG and body["seed"] == 2 and body["text"] and body["umt5_tokens"] <= 512
    assert body["model"].startswith("local:") and not body["cached"]
    again = tiny_client.post("/api/v1/prompts/extend", json={"text": DOG, "seed": 2}).json()
    assert again["cached"] and again["text"] == body["text"]


def test_input_is_size_checked_and_validated(tiny_client: httpx.Client) -> None:
    huge = tiny_client.post(
        "/api/v1/prompts/extend", content=b'{"text": "' + b"x" * 100_000 + b'"}',
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    assert huge.status_code == 413
    assert tiny_client.post("/api/v1/prompts/extend", json={"text": "x" * 4001}).status_code == 422
    assert tiny_client.post("/api/v1/prompts/extend", json={"text": ""}).status_code == 422
    assert tiny_client.post("/api/v1/prompts/extend", json={"text": "a", "evil": 1}).status_code == 422
    assert tiny_client.post("/api/v1/prompts/extend", json={"text": "a", "seed": -1}).status_code == 422
    assert tiny_client.post("/api/v1/prompts/extend", content=b"not json").status_code == 422


def test_a_server_without_the_extender_says_how_to_get_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANSTREAM_MODELS_DIR", str(tmp_path / "none"))
    with client_for() as c:
        r = c.post("/api/v1/prompts/extend", json={"text": DOG})
        assert r.status_code == 503
        assert "--with-prompt-extender" in r.json()["detail"]
        assert c.get("/health").status_code == 200


def test_the_model_runs_off_the_event_loop_one_at_a_time(models_dir: Path) -> None:
    backend = GatedBackend()
    count = umt5_counter(PromptTokenizer(demo_tokenizer()))
    with client_for(lambda: PromptExtender(backend, count)) as c:
        answers: list[httpx.Response] = []
        worker = threading.Thread(
            target=lambda: answers.append(c.post("/api/v1/prompts/extend", json={"text": DOG}))
        )
        worker.start()
        assert backend.started.wait(30)
        assert c.get("/health").status_code == 200  # the loop answers while the model works
        busy = c.post("/api/v1/prompts/extend", json={"text": "another"})
        assert busy.status_code == 409
        backend.release.set()
        worker.join(30)
        assert answers[0].status_code == 200
        assert answers[0].json()["text"] == "A dog runs across a sunny lawn, tracking shot."


def test_a_slow_extension_times_out(models_dir: Path) -> None:
    backend = GatedBackend()  # never released
    count = umt5_counter(PromptTokenizer(demo_tokenizer()))
    with client_for(lambda: PromptExtender(backend, count)) as c:
        r = c.post("/api/v1/prompts/extend", json={"text": DOG, "timeout_s": 0.2})
        assert r.status_code == 504
        backend.release.set()
