"""Prompt extension through an OpenAI-compatible endpoint: a loopback fake server, real HTTP (httpx)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from fake_openai import FakeOpenAI

from wanstream.prompting.backends import build_extender
from wanstream.prompting.extend import INSTRUCTIONS, ExtendError, ExtendTimeout

LONG = "A red fox trots through deep fresh snow. " * 200  # far past 512 umT5 tokens
GOOD = "A red fox with a bushy tail trots through deep snow, slow tracking shot, soft dawn light."


def test_the_endpoint_gets_our_instructions_seed_and_key(
    models_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("WANSTREAM_EXTENDER_API_KEY", "sk-test")
    with FakeOpenAI([f'"{GOOD}"'], key="sk-test") as api:
        extender = build_extender(models_dir=models_dir, url=api.url, model="tiny-chat", cache=tmp_path / "c")
        ext = extender.extend("a red fox in snow", seed=11)
        again = extender.extend("a red fox in snow", seed=11)
    assert ext.text == GOOD and not ext.truncated and not ext.cached
    assert ext.model == f"openai:{api.url}:tiny-chat"
    assert again.cached and len(api.requests) == 1
    body = api.requests[0]
    assert body["model"] == "tiny-chat" and body["seed"] == 11 and body["stream"] is True
    assert body["messages"] == [
        {"role": "system", "content": INSTRUCTIONS},
        {"role": "user", "content": "a red fox in snow"},
    ]
    assert api.headers[0]["authorization"] == "Bearer sk-test"


def test_a_long_answer_is_retried_once_then_cut_to_512_tokens(models_dir: Path) -> None:
    with FakeOpenAI([LONG, LONG]) as api:
        extender = build_extender(models_dir=models_dir, url=api.url, cache=False)
        ext = extender.extend("a red fox in snow")
    assert len(api.requests) == 2
    assert "too long" in api.requests[1]["messages"][-1]["content"]
    assert api.headers[0].get("authorization") is None  # no key set: none sent
    assert ext.truncated and ext.umt5_tokens <= 512 and ext.umt5_tokens == extender.count_tokens(ext.text)
    assert ext.text.endswith("snow.")  # cut at a sentence boundary
    assert LONG.startswith(ext.text)


def test_a_refused_key_and_an_unreachable_endpoint_are_clear_errors(models_dir: Path) -> None:
    with FakeOpenAI([GOOD], key="right") as api:
        extender = build_extender(models_dir=models_dir, url=api.url, cache=False)
        with pytest.raises(ExtendError, match="WANSTREAM_EXTENDER_API_KEY"):
            extender.extend("a fox")
        dead = api.url
    with pytest.raises(ExtendError, match="cannot reach"):
        build_extender(models_dir=models_dir, url=dead, cache=False).extend("a fox")


def test_a_stalled_endpoint_times_out(models_dir: Path) -> None:
    with FakeOpenAI([GOOD]) as api:
        api.hold = threading.Event()  # the server does not answer until the test ends
        extender = build_extender(models_dir=models_dir, url=api.url, cache=False, timeout_s=0.5)
        with pytest.raises(ExtendTimeout):
            extender.extend("a fox")


def test_a_cached_text_that_does_not_fit_this_tokenizer_is_asked_again(
    models_dir: Path, tmp_path: Path
) -> None:
    with FakeOpenAI([GOOD]) as api:
        extender = build_extender(models_dir=models_dir, url=api.url, cache=tmp_path / "c")
        cache = extender.cache
        # An entry written by a run whose tokenizer counted fewer tokens (e.g. the demo model's).
        cache.put(cache.key("a fox", extender.backend.name, 0, 512), {"text": LONG, "prompt": "a fox"})
        ext = extender.extend("a fox")
    assert not ext.cached and ext.text == GOOD and len(api.requests) == 1
