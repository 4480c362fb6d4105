"""`POST /api/v1/prompts/extend`: a prompt extended into one detailed paragraph (docs/prompts.md).

The extender (the local instruct model, or the endpoint `serve --extender-url` names) is built at the first
request, so a server without it starts and streams as usual; the request then answers 503 with the download
command. The model runs in a worker thread, never on the event loop; one extension runs at a time (409 while
one does); a client that hangs up cancels its extension. Codes: 413 body too large, 422 bad input, 503 not
installed, 504 out of time, 502 the extender failed.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel, ConfigDict, Field

from wanstream.prompting.extend import (
    MAX_PROMPT_CHARS,
    ExtendCancelled,
    ExtendError,
    ExtendTimeout,
    PromptExtender,
)
from wanstream.server.request_body import read_json

router = APIRouter(prefix="/api/v1/prompts", tags=["prompts"])

MAX_BODY_BYTES = 4 * MAX_PROMPT_CHARS + 1024  # the prompt (up to 4 bytes a character in UTF-8) and the fields
MAX_TIMEOUT_S = 600.0
ExtenderFactory = Callable[[], PromptExtender]


class ExtendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str = Field(..., min_length=1, max_length=MAX_PROMPT_CHARS, description="The prompt to extend.")
    seed: int = Field(
        0, ge=0, le=2**63 - 1, description="Sampling seed: the same prompt and seed, the same text."
    )
    timeout_s: float | None = Field(
        None, gt=0, le=MAX_TIMEOUT_S, description="Give up after this many seconds (default: the server's)."
    )


class ExtendResponse(BaseModel):
    prompt: str
    text: str = Field(..., description="The extended prompt: one paragraph, at most 512 umT5 tokens.")
    model: str
    seed: int
    umt5_tokens: int
    truncated: bool
    cached: bool
    seconds: float


class ExtenderHolder:
    """Builds the extender once, on first use, in a worker thread (it may read a tokenizer from disk)."""

    def __init__(self, factory: ExtenderFactory) -> None:
        self.factory = factory
        self.extender: PromptExtender | None = None
        self.busy = False  # one extension at a time (the event loop's own flag: no lock shared with threads)
        self._build_lock = threading.Lock()

    def get(self) -> PromptExtender:
        with self._build_lock:
            if self.extender is None:
                self.extender = self.factory()
            return self.extender


def default_factory(models_dir: Any, demo: bool, **options: Any) -> ExtenderFactory:
    """The local model from the models folder (the demo server counts tokens with the demo's tokenizer)."""

    def build() -> PromptExtender:
        from wanstream.prompting.backends import build_extender

        tokenizer = None
        if demo:
            from wanstream.engine.random_weights import demo_tokenizer
            from wanstream.models.text import PromptTokenizer

            tokenizer = PromptTokenizer(demo_tokenizer())
        return build_extender(models_dir=models_dir, tokenizer=tokenizer, **options)

    return build


@router.post("/extend")
async def extend(request: Request) -> ExtendResponse:
    """Extend a prompt (`{"text": ..., "seed": 0}`); the studio shows the result for editing before use."""
    from wanstream.weights.store import MissingWeightsError

    body = await read_json(request, ExtendRequest, MAX_BODY_BYTES)
    holder: ExtenderHolder = request.app.state.prompt_extender
    if holder.busy:
        raise HTTPException(409, "a prompt is being extended; try again when it is done")
    holder.busy = True
    cancel = threading.Event()
    try:
        work = asyncio.ensure_future(asyncio.to_thread(_extend, holder, body, cancel))
        while True:
            done, _ = await asyncio.wait({work}, timeout=0.25)
            if done:
                break
            if await request.is_disconnected():
                cancel.set()  # the client went away: stop the model at its next token
        result = work.result()
    except asyncio.CancelledError:
        cancel.set()
        raise
    except MissingWeightsError as exc:
        raise HTTPException(503, f"the prompt extender is not installed on this server.\n{exc}") from None
    except ExtendTimeout as exc:
        raise HTTPException(504, str(exc)) from None
    except ExtendCancelled as exc:
        raise HTTPException(499, str(exc)) from None
    except ExtendError as exc:
        raise HTTPException(502, str(exc)) from None
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None
    finally:
        holder.busy = False
    return ExtendResponse(**result.to_dict())


def _extend(holder: ExtenderHolder, body: ExtendRequest, cancel: threading.Event) -> Any:
    return holder.get().extend(body.text, seed=body.seed, timeout_s=body.timeout_s, cancel=cancel)
