"""Prompt extension with a tiny random Qwen2 instruct model: the whole local path, bounds, cache, errors."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from wanstream.cli.main import main
from wanstream.prompting.backends import LocalBackend, build_extender
from wanstream.prompting.extend import (
    INSTRUCTIONS,
    UMT5_LIMIT,
    ExtendCancelled,
    ExtendTimeout,
    PromptCache,
    PromptExtender,
    fit_tokens,
    one_paragraph,
)
from wanstream.weights.store import MissingWeightsError

DOG = "a cartoon dog jumping and then running"


class CountingBackend:
    """Wraps a backend and records each chat it is asked."""

    def __init__(self, inner: LocalBackend) -> None:
        self.inner = inner
        self.calls: list[list[dict[str, str]]] = []

    @property
    def name(self) -> str:
        return self.inner.name

    def complete(self, messages, **kwargs) -> str:
        self.calls.append(list(messages))
        return self.inner.complete(messages, **kwargs)


class StopsAfter(threading.Event):
    """An event that reads as set from its (n+1)-th check on: a cancel arriving mid-generation."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n
        self.checks = 0

    def is_set(self) -> bool:
        self.checks += 1
        return self.checks > self.n


def test_the_whole_local_path_runs_bounded_one_paragraph_and_seeded(models_dir: Path, tmp_path: Path) -> None:
    extender = build_extender(models_dir=models_dir, cache=tmp_path / "cache")
    counting = CountingBackend(extender.backend)
    extender.backend = counting
    tokens = extender.count_tokens

    ext = extender.extend(DOG, seed=3)

    assert ext.prompt == DOG and ext.seed == 3 and not ext.cached
    assert ext.model.startswith("local:Qwen2.5-1.5B-Instruct:")
    assert ext.text and "\n" not in ext.text and ext.text == ext.text.strip()
    assert ext.umt5_tokens == tokens(ext.text) <= UMT5_LIMIT
    # The model saw our instructions and the prompt as written.
    first = counting.calls[0]
    assert first[0] == {"role": "system", "content": INSTRUCTIONS}
    assert first[1] == {"role": "user", "content": DOG}
    # Same seed, fresh extender, no cache: the same text; another seed: another text.
    again = build_extender(models_dir=models_dir, cache=False).extend(DOG, seed=3)
    other = build_extender(models_dir=models_dir, cache=False).extend(DOG, seed=4)
    assert again.text == ext.text and not again.cached
    assert other.text != ext.text


def test_an_answer_over_the_token_limit_is_retried_once_then_cut(models_dir: Path) -> None:
    extender = build_extender(models_dir=models_dir, cache=False)
    counting = CountingBackend(extender.backend)
    extender.backend = counting
    extender.limit = 6  # the tiny model's gibberish takes more umT5 tokens than that
    ext = extender.extend(DOG, seed=4)
    assert ext.umt5_tokens == extender.count_tokens(ext.text) <= 6
    assert ext.text
    assert len(counting.calls) == 2  # the first answer was too long: asked once for less
    assert "too long" in counting.calls[1][-1]["content"]
    assert counting.calls[1][-2]["role"] == "assistant"
    assert ext.truncated == (extender.count_tokens(one_paragraph(_last_answer(counting))) > 6)


def _last_answer(counting: CountingBackend) -> str:
    messages = counting.calls[-1]
    return counting.inner.complete(messages, seed=4, max_new_tokens=384, deadline=time.monotonic() + 600,
                                   cancel=threading.Event())  # fmt: skip


def test_extensions_are_cached_by_text_model_and_seed(models_dir: Path, tmp_path: Path) -> None:
    cache = PromptCache(tmp_path / "cache")
    extender = build_extender(models_dir=models_dir, cache=tmp_path / "cache")
    counting = CountingBackend(extender.backend)
    extender.backend = counting
    first = extender.extend(DOG, seed=1)
    asked = len(counting.calls)
    second = extender.extend(DOG, seed=1)
    assert second.cached and second.text == first.text and second.umt5_tokens == first.umt5_tokens
    assert len(counting.calls) == asked  # no model call
    stored = json.loads(cache.path(cache.key(DOG, extender.backend.name, 1, UMT5_LIMIT)).read_text())
    assert stored["text"] == first.text and stored["prompt"] == DOG
    # Another seed or another text is another entry.
    assert not extender.extend(DOG, seed=2).cached
    assert not extender.extend(DOG + " fast", seed=1).cached
    # A new process (a new extender on the same folder) reads the same cache.
    fresh = build_extender(models_dir=models_dir, cache=tmp_path / "cache")
    assert fresh.extend(DOG, seed=1).cached


def test_the_local_model_stops_at_the_deadline_and_on_cancel(models_dir: Path) -> None:
    backend = build_extender(models_dir=models_dir, cache=False).backend
    messages = [{"role": "user", "content": DOG}]
    with pytest.raises(ExtendTimeout):
        backend.complete(
            messages, seed=0, max_new_tokens=300, deadline=time.monotonic(), cancel=threading.Event()
        )
    cancel = StopsAfter(5)
    with pytest.raises(ExtendCancelled):
        backend.complete(messages, seed=0, max_new_tokens=300, deadline=time.monotonic() + 600, cancel=cancel)
    assert cancel.checks == 6  # generation stopped at the step the cancel was seen, not after 300 tokens


def test_the_extender_bounds_the_whole_call(models_dir: Path) -> None:
    extender = build_extender(models_dir=models_dir, cache=False)
    with pytest.raises(ExtendTimeout):
        extender.extend(DOG, timeout_s=0)
    done = threading.Event()
    done.set()
    with pytest.raises(ExtendCancelled):
        extender.extend(DOG, cancel=done)


def test_a_missing_model_says_which_command_downloads_it(models_dir: Path, tmp_path: Path) -> None:
    (models_dir / "Qwen2.5-1.5B-Instruct" / "model.safetensors").unlink()
    with pytest.raises(MissingWeightsError) as info:
        build_extender(models_dir=models_dir)
    assert "wanstream download" in str(info.value) and "--with-prompt-extender" in str(info.value)
    assert "Qwen2.5-1.5B-Instruct/model.safetensors" in str(info.value)
    with pytest.raises(MissingWeightsError) as info:
        build_extender(models_dir=tmp_path / "empty", url="http://127.0.0.1:9/v1")
    assert "google/umt5-xxl" in str(info.value)  # the token counter needs the pipeline's tokenizer


def test_cli_extend_prints_the_text_and_reports_missing_models(
    models_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["extend", DOG, "--models-dir", str(models_dir), "--seed", "5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["prompt"] == DOG and out["seed"] == 5 and out["umt5_tokens"] <= UMT5_LIMIT
    assert main(["extend", DOG, "--models-dir", str(models_dir), "--seed", "5"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == out["text"]  # stdout holds the text alone
    assert "cache" in captured.err
    assert main(["extend", "  ", "--models-dir", str(models_dir)]) == 2
    assert main(["extend", DOG, "--models-dir", str(tmp_path / "nothing")]) == 1
    assert "wanstream download" in capsys.readouterr().err


def test_answers_become_one_paragraph() -> None:
    assert one_paragraph('Extended prompt: "A fox\n\nruns  in snow."') == "A fox runs in snow."
    assert one_paragraph("<think>hmm</think>  Un renard court.") == "Un renard court."


def test_fit_tokens_cuts_at_a_sentence_boundary_else_a_word() -> None:
    def words(text: str) -> int:
        return len(text.split()) + 1  # like umT5: </s> counts

    text = "One two three. Four five six. Seven eight nine."
    assert fit_tokens(text, words, 7) == "One two three. Four five six."
    assert fit_tokens(text, words, 3) == "One two"
    assert fit_tokens(text, words, 100) == text
    assert fit_tokens("一只狗在跑。它很快乐。", lambda t: len(t) + 1, 8) == "一只狗在跑。"


def test_prompts_are_size_checked_before_any_work(models_dir: Path) -> None:
    extender = PromptExtender(_NeverCalled(), lambda t: 1)
    with pytest.raises(ValueError, match="at most"):
        extender.extend("x" * 5000)
    with pytest.raises(ValueError, match="empty"):
        extender.extend("   ")


class _NeverCalled:
    name = "never"

    def complete(self, *args, **kwargs) -> str:
        raise AssertionError("the model must not be asked")
