"""The LoRA library over REST: add by link (a background job with progress), list with provenance, remove."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from fakehub import _safetensors_bytes
from fakeweb import FakeWeb
from test_lora_library import META, lora_bytes

from wanstream.weights.lora_library import wan_1_3b_targets


@pytest.fixture(scope="module", autouse=True)
def targets() -> None:
    wan_1_3b_targets()


@pytest.fixture
def web(clean_env: None) -> Iterator[FakeWeb]:
    with FakeWeb() as fake:
        yield fake


def make_client(lora_dir: Path | None) -> Iterator[httpx.Client]:
    from starlette.testclient import TestClient

    from wanstream.server import ServerConfig, create_app

    app = create_app(ServerConfig(demo=True, preload=False, lora_dir=lora_dir))
    with TestClient(app, base_url="http://127.0.0.1:8000") as c:
        yield c


@pytest.fixture
def client(tmp_path: Path) -> Iterator[httpx.Client]:
    (tmp_path / "loras").mkdir()
    yield from make_client(tmp_path / "loras")


def wait_job(c: httpx.Client, job_id: str, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = c.get(f"/api/v1/loras/jobs/{job_id}").json()
        if job["state"] != "running":
            return job
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} still running after {timeout} s")


def test_add_by_link_then_pick_it_then_remove(client: httpx.Client, web: FakeWeb, tmp_path: Path) -> None:
    data = lora_bytes(meta=META)
    web.files["ink.safetensors"] = data
    started = client.post("/api/v1/loras", json={"source": web.file_url("ink.safetensors")})
    assert started.status_code == 202, started.text
    job = wait_job(client, started.json()["id"])
    assert job["state"] == "done", job
    assert job["bytes"] == job["total"] == len(data)
    assert job["lora"]["name"] == "ink.safetensors" and job["lora"]["trigger_words"] == [
        "inkstyle",
        "bold lines",
    ]
    [listed] = client.get("/api/v1/loras").json()
    assert listed["name"] == "ink.safetensors" and listed["provenance"]["sha256"] == job["lora"]["sha256"]
    assert client.get("/api/v1/loras/jobs").json()[0]["id"] == job["id"]
    # The name is now one a stream's settings accept (the existing LoRA checks apply to it).
    assert (tmp_path / "loras" / "ink.safetensors").read_bytes() == data
    assert client.delete("/api/v1/loras/ink.safetensors").status_code == 204
    assert client.get("/api/v1/loras").json() == []
    assert client.delete("/api/v1/loras/ink.safetensors").status_code == 404


def test_bad_requests_are_refused_before_any_download(
    client: httpx.Client, web: FakeWeb, tmp_path: Path
) -> None:
    web.files["ink.safetensors"] = lora_bytes()
    link = web.file_url("ink.safetensors")
    assert client.post("/api/v1/loras", json={"source": "ftp://x/y.safetensors"}).status_code == 422
    assert client.post("/api/v1/loras", json={"source": link, "name": "../x.safetensors"}).status_code == 422
    assert client.post("/api/v1/loras", json={"source": link, "extra": 1}).status_code == 422
    big = client.post("/api/v1/loras", content=b'{"source": "' + b"a" * 20_000 + b'"}')
    assert big.status_code == 413
    assert web.gets("ink.safetensors") == []
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(b"keep")
    # The client normalises "../" away; encoded, it reaches the route and is refused there.
    assert client.delete("/api/v1/loras/../outside.safetensors").status_code != 204
    assert client.delete("/api/v1/loras/%2E%2E%2Foutside.safetensors").status_code == 422
    assert outside.read_bytes() == b"keep"


def test_a_job_can_be_cancelled(client: httpx.Client, web: FakeWeb, tmp_path: Path) -> None:
    web.files["slow.safetensors"] = lora_bytes()
    web.hold = threading.Event()  # the server sits on the download until released
    job_id = client.post("/api/v1/loras", json={"source": web.file_url("slow.safetensors")}).json()["id"]
    deadline = time.monotonic() + 30
    while not web.gets("slow.safetensors"):
        assert time.monotonic() < deadline, "the download never started"
        time.sleep(0.02)
    assert client.get(f"/api/v1/loras/jobs/{job_id}").json()["state"] == "running"
    assert client.delete(f"/api/v1/loras/jobs/{job_id}").status_code == 204
    web.hold.set()
    job = wait_job(client, job_id)
    assert job["state"] == "cancelled" and "cancelled" in job["error"]
    assert not (tmp_path / "loras" / "slow.safetensors").exists()
    assert client.delete("/api/v1/loras/jobs/nope").status_code == 404


def test_a_file_that_does_not_fit_fails_its_job(client: httpx.Client, web: FakeWeb) -> None:
    web.files["x.safetensors"] = _safetensors_bytes({"model.weight": torch.zeros(2, 2)})
    job = wait_job(
        client, client.post("/api/v1/loras", json={"source": web.file_url("x.safetensors")}).json()["id"]
    )
    assert job["state"] == "failed" and "does not fit Wan2.1-T2V-1.3B" in job["error"]
    assert client.get("/api/v1/loras").json() == []


def test_without_a_lora_folder_nothing_is_added(web: FakeWeb) -> None:
    for c in make_client(None):
        r = c.post("/api/v1/loras", json={"source": "civitai:1"})
        assert r.status_code == 409 and "--lora-dir" in r.json()["detail"]
