"""The studio's Extend button and its LoRA link box in a real browser, against `wanstream serve --demo` with a
tiny random prompt extender in its models folder and a LoRA folder; LoRA links point at a loopback web server.

Extend: the result is shown for editing and changes nothing until "Use" (which only replaces the editor's
text). LoRA: a pasted link downloads with progress, is listed with its provenance and trigger words, and
"Use" adds it to the stream's LoRAs.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from server.harness import ServerProcess
from studio.drivers import DriverBase
from weights.fakeweb import FakeWeb

from support.tiny_instruct import write_tiny_instruct

pytestmark = pytest.mark.browser


def wan_1_3b_lora() -> bytes:
    """A rank-2 LoRA on two self-attention layers of Wan2.1-T2V-1.3B (dim 1536), with a trigger phrase."""
    g = torch.Generator().manual_seed(0)
    sd = {}
    for layer in ("lora_unet_blocks_0_self_attn_q", "lora_unet_blocks_0_self_attn_k"):
        sd[f"{layer}.lora_down.weight"] = torch.randn(2, 1536, generator=g).half()
        sd[f"{layer}.lora_up.weight"] = torch.randn(1536, 2, generator=g).half()
    return save(sd, metadata={"modelspec.trigger_phrase": "inkstyle"})


@pytest.fixture(scope="module")
def web() -> Iterator[FakeWeb]:
    with FakeWeb() as fake:
        fake.files["ink.safetensors"] = wan_1_3b_lora()
        yield fake


@pytest.fixture(scope="module")
def library_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("studio-extend")
    write_tiny_instruct(root / "models" / "Qwen2.5-1.5B-Instruct")
    (root / "loras").mkdir()
    with pytest.MonkeyPatch.context() as env:  # the server process inherits these
        env.setenv("XDG_CACHE_HOME", str(root / "cache"))
        env.delenv("WANSTREAM_EXTENDER_API_KEY", raising=False)
        server = ServerProcess(
            "--demo", "--models-dir", str(root / "models"), "--lora-dir", str(root / "loras"),
            log_path=root / "server.log",
        )  # fmt: skip
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def test_extend_shows_the_result_for_editing_and_lora_links_download(
    chromium: DriverBase, library_server: ServerProcess, web: FakeWeb, artifacts: Path
) -> None:
    d = chromium
    d.goto(f"{library_server.url}/")
    d.wait("document.body.dataset.ready === 'true'", 15, "the studio to start")

    d.fill('[aria-label="prompt 1"]', "a cartoon dog jumping")
    d.click('[aria-label="extend prompt 1"]')
    review = '[aria-label="extended prompt 1 (edit before use)"]'
    d.wait(f"!!document.querySelector('{review}')", 120, "the extended prompt to show for review")
    extended = d.js(f"document.querySelector('{review}').value")
    assert extended and "\n" not in extended
    # Shown, not applied: the prompt and the saved state are what the user wrote.
    assert d.js("document.querySelector('[aria-label=\"prompt 1\"]').value") == "a cartoon dog jumping"
    assert d.js("window.studio.state.prompts[0].text") == "a cartoon dog jumping"
    d.fill(review, "a cartoon dog jumping, edited by hand")
    d.screenshot(artifacts / "chromium-extend-review.png", "#prompt-panel")
    d.click('[aria-label="extended prompt 1"] button.primary')  # Use
    d.wait(
        "window.studio.state.prompts[0].text === 'a cartoon dog jumping, edited by hand'",
        5,
        "the edited text",
    )
    assert d.js(f"!document.querySelector('{review}')")

    # A LoRA by link: progress, provenance, then picked into the stream's LoRAs.
    d.wait("!!document.querySelector('[aria-label=\"LoRA link\"]')", 15, "the LoRA link box")
    d.fill('[aria-label="LoRA link"]', web.file_url("ink.safetensors"))
    d.click("text=Add from link")
    d.wait(
        "document.querySelector('[aria-label=\"LoRA download status\"]').textContent.startsWith('✓')",
        60,
        "the LoRA to be added",
    )
    status = d.text('[aria-label="LoRA download status"]')
    assert "ink.safetensors added" in status and "inkstyle" in status
    d.click("text=Use ink.safetensors")
    d.wait(
        "[...document.querySelectorAll('[aria-label=\"LoRA file\"]')].some(n => n.value === 'ink.safetensors')",
        10,
        "the LoRA row",
    )
    d.wait("document.body.textContent.includes('trigger words: inkstyle')", 10, "the trigger words")
    assert [s for s in d.js("window.studio.state.settings.loras || []") if s["path"] == "ink.safetensors"]
    d.screenshot(artifacts / "chromium-lora-link.png")
    assert d.errors == [], f"errors in the page: {d.errors}"
