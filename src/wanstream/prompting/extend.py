"""Extend a short prompt into one detailed paragraph, bounded in time and in umT5 tokens.

    extender = build_extender()                      # the local instruct model (or url=... for an endpoint)
    ext = extender.extend("a cartoon dog jumping and then running", seed=0)
    ext.text                                          # one paragraph, at most 512 umT5 tokens

The language model is a backend (`backends.py`: a local transformers model, or any OpenAI-compatible
endpoint); this module owns what is the same for both: the instructions, cleaning the answer into one
paragraph, the token limit (checked with the umT5 tokenizer the pipeline itself uses: one retry asking for
less, then a cut at a sentence boundary), the deadline and cancellation, and the on-disk cache (keyed by
prompt, model, seed and instructions), so a prompt is extended once.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # torch stays unimported until a model is used (the CLI's parser imports this module)
    from wanstream.models.text import PromptTokenizer

MAX_PROMPT_CHARS = 4000  # input: a prompt to extend is a sentence or a paragraph, never a document
UMT5_LIMIT = 512  # the text encoder's context (tokens, </s> included): more is cut off by the pipeline
DEFAULT_TIMEOUT_S = 120.0
DEFAULT_MAX_NEW_TOKENS = 384  # about 250 words: the paragraph asked for, with room to finish a sentence
# Bump when INSTRUCTIONS change: cached extensions made with other instructions are not reused.
INSTRUCTIONS_VERSION = 1

INSTRUCTIONS = """\
You rewrite short prompts for a text-to-video model into one detailed paragraph that the model can film.

Rules:
1. Keep everything the user wrote: every subject, action, object, name, style and order of events stays, \
with its meaning. Never contradict it and never drop a part of it.
2. Add what a video needs, concretely: the subject's appearance (shape, colours, clothing, textures), the \
motion (what moves, how fast, in what order), the setting and background, the visual style (for example \
photorealistic, 3D cartoon, watercolor, anime, film grain), the camera (shot size, angle, movement) and the \
lighting (time of day, light quality, colours).
3. Describe only what can be seen. No sounds, no thoughts, no story before or after the clip.
4. Write exactly one paragraph of 80 to 150 words: no title, no list, no line breaks, no quotation marks.
5. Write in the same language as the user's prompt.
6. Answer with the paragraph only.

Example. User: "A cartoon dog jumping and then running."
Answer: A cheerful cartoon dog with floppy brown ears, a white chest and a wagging tail crouches on a sunny \
green lawn, then springs high into the air with its paws tucked in, lands softly and bursts into a run \
across the grass, ears flapping and tongue out. Behind it, rounded trees and a bright blue sky with puffy \
white clouds. Bold outlines, flat saturated colours and smooth, bouncy 2D animation. The camera follows at \
the dog's height in a medium tracking shot, panning as it runs. Warm midday sunlight casts short soft \
shadows."""

_SHORTER = (
    "That paragraph is too long. Rewrite it in at most {words} words, keeping every element of my original "
    "prompt. Answer with the paragraph only."
)
_LABEL = re.compile(
    r"^\s*(extended prompt|prompt|answer|paragraph|rewritten prompt)\s*[:：]\s*", re.IGNORECASE
)
_QUOTES = "\"'“”‘’«»「」"
_SENTENCE_END = re.compile(r"(?<=[.!?。！？])\s+|(?<=[。！？])")


class ExtendError(RuntimeError):
    """The prompt could not be extended; the message says why and what to do."""


class ExtendTimeout(ExtendError):
    """The extender did not answer within its time limit."""


class ExtendCancelled(ExtendError):
    """The caller cancelled the extension."""


Messages = list[dict[str, str]]


class Backend(Protocol):
    """A language model that answers a chat (see `backends.py`)."""

    @property
    def name(self) -> str:
        """Identifies the model (and endpoint) for the cache key and for reports."""
        ...

    def complete(
        self,
        messages: Messages,
        *,
        seed: int,
        max_new_tokens: int,
        deadline: float,
        cancel: threading.Event,
    ) -> str:
        """The answer. Stops early and raises `ExtendTimeout` once `time.monotonic()` passes `deadline`,
        `ExtendCancelled` once `cancel` is set."""
        ...


@dataclass(frozen=True)
class Extension:
    prompt: str  # what the user wrote
    text: str  # the extended prompt
    model: str  # the backend's name
    seed: int
    umt5_tokens: int  # of `text`, </s> included
    truncated: bool  # cut at a sentence boundary to fit the token limit
    cached: bool  # read from the cache (no model call)
    seconds: float  # of this call

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


class PromptCache:
    """Extensions on disk, one small JSON file per (prompt, model, seed, instructions, limit)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def key(self, prompt: str, model: str, seed: int, limit: int) -> str:
        ident = {"v": INSTRUCTIONS_VERSION, "prompt": prompt, "model": model, "seed": seed, "limit": limit}
        return hashlib.sha256(json.dumps(ident, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict | None:
        try:
            data = json.loads(self.path(key).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) and isinstance(data.get("text"), str) else None

    def put(self, key: str, data: dict) -> None:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")
        os.replace(tmp, path)


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/wanstream/prompt-extensions (next to the default models folder)."""
    from wanstream.weights.store import default_models_dir

    return default_models_dir().parent / "prompt-extensions"


def umt5_counter(tokenizer: PromptTokenizer) -> Callable[[str], int]:
    """How many umT5 tokens the pipeline's tokenizer makes of a text (</s> included, before its cut)."""
    from wanstream.models.text import clean_prompt

    def count(text: str) -> int:
        return len(tokenizer.tokenizer(clean_prompt(text), add_special_tokens=True)["input_ids"])

    return count


class PromptExtender:
    """Extends prompts with a `Backend`; thread-safe (one model call at a time)."""

    def __init__(
        self,
        backend: Backend,
        count_tokens: Callable[[str], int],
        *,
        cache: PromptCache | None = None,
        limit: int = UMT5_LIMIT,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    ) -> None:
        if limit < 2:
            raise ValueError(f"limit must be at least 2 tokens, got {limit}")
        self.backend = backend
        self.count_tokens = count_tokens
        self.cache = cache
        self.limit = limit
        self.timeout_s = timeout_s
        self.max_new_tokens = max_new_tokens
        self._lock = threading.Lock()

    def extend(
        self,
        prompt: str,
        *,
        seed: int = 0,
        timeout_s: float | None = None,
        cancel: threading.Event | None = None,
    ) -> Extension:
        """The extended prompt (from the cache when this prompt, model and seed were extended before).

        Bounded: at most `timeout_s` (default: the extender's) of model time, else `ExtendTimeout`; setting
        `cancel` stops it with `ExtendCancelled`. The result has at most `limit` umT5 tokens."""
        start = time.monotonic()
        prompt = check_prompt(prompt)
        if not 0 <= seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {seed}")
        key = self.cache.key(prompt, self.backend.name, seed, self.limit) if self.cache is not None else ""
        hit = self.cache.get(key) if self.cache is not None else None
        # (A hit counted by another tokenizer, e.g. the demo model's, is used only if it fits this one.)
        if hit is not None and (tokens := self.count_tokens(hit["text"])) <= self.limit:
            truncated = bool(hit.get("truncated"))
            return Extension(prompt, hit["text"], self.backend.name, seed, tokens, truncated, True, 0.0)
        deadline = start + (self.timeout_s if timeout_s is None else timeout_s)
        cancel = cancel or threading.Event()
        with self._lock:  # a model answers one chat at a time; a waiting caller's clock runs meanwhile
            text, truncated = self._run(prompt, seed, deadline, cancel)
        tokens = self.count_tokens(text)
        if self.cache is not None:
            record = {
                "prompt": prompt,
                "model": self.backend.name,
                "seed": seed,
                "text": text,
                "truncated": truncated,
            }
            self.cache.put(key, record)
        return Extension(
            prompt, text, self.backend.name, seed, tokens, truncated, False, time.monotonic() - start
        )

    def _run(self, prompt: str, seed: int, deadline: float, cancel: threading.Event) -> tuple[str, bool]:
        messages: Messages = [
            {"role": "system", "content": INSTRUCTIONS},
            {"role": "user", "content": prompt},
        ]
        text = self._ask(messages, seed, deadline, cancel)
        if self.count_tokens(text) <= self.limit:
            return text, False
        # Too long: ask once for a shorter paragraph (about 0.6 words per umT5 token in English), then cut.
        words = max(10, int(self.limit * 0.6))
        messages += [
            {"role": "assistant", "content": text},
            {"role": "user", "content": _SHORTER.format(words=words)},
        ]
        try:
            shorter = self._ask(messages, seed, deadline, cancel)
        except ExtendTimeout:
            shorter = text  # the first answer is usable once cut to size
        if self.count_tokens(shorter) <= self.limit:
            return shorter, False
        return fit_tokens(shorter, self.count_tokens, self.limit), True

    def _ask(self, messages: Messages, seed: int, deadline: float, cancel: threading.Event) -> str:
        if cancel.is_set():
            raise ExtendCancelled("prompt extension cancelled")
        if time.monotonic() >= deadline:
            raise ExtendTimeout("prompt extension timed out before the model was asked")
        raw = self.backend.complete(
            messages, seed=seed, max_new_tokens=self.max_new_tokens, deadline=deadline, cancel=cancel
        )
        text = one_paragraph(raw)
        if not text:
            raise ExtendError(f"the prompt extender ({self.backend.name}) returned no text; try another seed")
        return text


def check_prompt(prompt: str) -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("the prompt to extend is empty")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ValueError(f"the prompt to extend has {len(prompt)} characters; at most {MAX_PROMPT_CHARS}")
    return prompt.strip()


def one_paragraph(raw: str) -> str:
    """The model's answer as one plain paragraph: labels, wrapping quotes and line breaks removed."""
    text = re.sub(r"<think>.*?</think>", " ", raw, flags=re.DOTALL)  # reasoning models' scratchpad
    text = " ".join(text.split())
    text = "".join(ch for ch in text if ch.isprintable())  # control bytes a small model may emit
    text = _LABEL.sub("", text)
    if len(text) >= 2 and text[0] in _QUOTES and text[-1] in _QUOTES:
        text = text[1:-1].strip()
    return text


def fit_tokens(text: str, count: Callable[[str], int], limit: int) -> str:
    """The longest start of `text` within `limit` tokens: whole sentences when at least one fits, else
    whole words (or characters, for scripts without spaces)."""
    if count(text) <= limit:
        return text
    sentences = [s for s in _SENTENCE_END.split(text) if s.strip()]
    kept = ""
    for sentence in sentences:
        candidate = f"{kept} {sentence}".strip() if kept and not _cjk(sentence) else kept + sentence
        if count(candidate) > limit:
            break
        kept = candidate
    if kept:
        return kept
    lo, hi = 0, len(text)  # the longest character prefix that fits (count grows with the prefix)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count(text[:mid]) <= limit:
            lo = mid
        else:
            hi = mid - 1
    cut = text[:lo]
    space = cut.rfind(" ")
    if space > len(cut) // 2 and lo < len(text) and not text[lo].isspace():
        cut = cut[:space]  # do not end in the middle of a word
    return cut.rstrip()


def _cjk(text: str) -> bool:
    return bool(re.match(r"[\u3000-\u9fff\uac00-\ud7af]", text))
