"""The server takes LoRAs by name from its LoRA folder only: at stream start and as live updates (REST)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from wanstream.engine.random_weights import demo_components
from wanstream.models.lora import linear_targets

from support.lora_files import lora_state_dict, random_pairs, write_lora


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("server-loras")
    shapes = linear_targets(demo_components().dit)
    blocks = [name for name in shapes if name.startswith("blocks.")]
    write_lora(root / "style.safetensors", lora_state_dict(random_pairs(shapes, blocks), "kohya"))
    bad = lora_state_dict(random_pairs(shapes, blocks[:2]), "wan-comfy")
    bad["diffusion_model.blocks.5.ffn.0.lora_A.weight"] = torch.zeros(4, 64)
    write_lora(root / "sub" / "bad.safetensors", bad)
    (root.parent / "outside.safetensors").write_bytes((root / "style.safetensors").read_bytes())
    return root


@pytest.fixture(scope="module")
def client(lora_dir: Path) -> Iterator[httpx.Client]:
    from starlette.testclient import TestClient

    from wanstream.server import ServerConfig, create_app

    threads = torch.get_num_threads()  # the server leaves a core to the media path: restore it after
    config = ServerConfig(demo=True, lora_dir=lora_dir, settings_overrides={"height": 64, "width": 64})
    app = create_app(config)
    try:
        with TestClient(app, base_url="http://127.0.0.1:8000") as c:
            assert app.state.model.wait(60).state == "loaded"
            yield c
    finally:
        torch.set_num_threads(threads)


def chunk_rows(c: httpx.Client, sid: str, since: int = -1) -> list[dict]:
    return [
        e
        for e in c.get(f"/api/v1/sessions/{sid}/events", params={"since": since}).json()
        if e["type"] == "chunk"
    ]


def wait_for_chunk(c: httpx.Client, sid: str, first: int, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = [e for e in chunk_rows(c, sid) if e["chunk"] >= first]
        if rows:
            return rows[0]
        time.sleep(0.05)
    raise AssertionError(f"no chunk {first} within {timeout} s")


def test_the_lora_folder_is_listed(client: httpx.Client) -> None:
    names = {item["name"] for item in client.get("/api/v1/loras").json()}
    assert names == {"style.safetensors", "sub/bad.safetensors"}


def test_loras_at_start_and_as_live_updates(client: httpx.Client, lora_dir: Path) -> None:
    body = {
        "source": "text",
        "prompts": ["ink"],
        "settings": {"loras": [{"path": "style.safetensors", "scale": 0.5}]},
    }
    created = client.post("/api/v1/sessions", json=body)
    assert created.status_code == 201, created.text
    sid = created.json()["session_id"]
    try:
        assert wait_for_chunk(client, sid, 0)["loras"] == [["style.safetensors", 0.5, "merged"]]
        ack = client.post(
            f"/api/v1/sessions/{sid}/control",
            json={"id": 1, "loras": [{"path": "style.safetensors", "scale": -1.25, "mode": "runtime"}]},
        )
        assert ack.status_code == 200, ack.text
        assert ack.json()["applied"] == ["loras"] and ack.json()["restarted"] is False
        row = wait_for_chunk(client, sid, ack.json()["next_chunk"])
        assert row["loras"] == [["style.safetensors", -1.25, "runtime"]]
        assert client.get(f"/api/v1/sessions/{sid}").json()["settings"]["loras"][0]["scale"] == -1.25

        # Rejected updates (a name outside the folder, a malformed file) change nothing.
        for loras, phrase in (
            ([{"path": "../outside.safetensors"}], "invalid LoRA name"),
            ([{"path": str(Path.cwd() / "x.safetensors")}], "invalid LoRA name"),
            (["sub/bad.safetensors"], "blocks.5.ffn.0"),
            ([{"path": "style.safetensors", "scale": 11}], "less than or equal to 10"),
        ):
            rejected = client.post(f"/api/v1/sessions/{sid}/control", json={"loras": loras, "seed": 3})
            assert rejected.status_code == 422 and phrase in rejected.text, rejected.text
            assert str(lora_dir) not in rejected.text  # clients are not told where the server keeps files
        settings = client.get(f"/api/v1/sessions/{sid}").json()["settings"]
        assert settings["loras"][0]["scale"] == -1.25 and settings["seed"] != 3
    finally:
        assert client.delete(f"/api/v1/sessions/{sid}").status_code == 204


@pytest.mark.parametrize(
    ("name", "phrase"),
    [
        ("../outside.safetensors", "invalid LoRA name"),
        ("/etc/passwd", "invalid LoRA name"),
        ("missing.safetensors", "no LoRA 'missing.safetensors'"),
    ],
)
def test_a_stream_naming_a_lora_outside_the_folder_is_refused(
    client: httpx.Client, name: str, phrase: str
) -> None:
    body = {"source": "text", "prompts": ["ink"], "settings": {"loras": [{"path": name}]}}
    refused = client.post("/api/v1/sessions", json=body)
    assert refused.status_code == 422 and phrase in refused.text, refused.text
    assert client.get("/api/v1/sessions").json() == []
