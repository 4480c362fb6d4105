"""The language models behind prompt extension: a local instruct model, or an OpenAI-compatible endpoint.

* `LocalBackend`: the downloaded Qwen2.5 instruct model (`wanstream download --with-prompt-extender`) run by
  `transformers`, loaded on first use: on the GPU when it has room next to what is already there, else on the
  CPU. Sampling is seeded (same prompt + seed → same text on the same device), and a stopping criterion ends
  generation at the deadline or on cancel.
* `OpenAIBackend`: `POST {url}/chat/completions` with `stream: true` (httpx), the key from an environment
  variable; the deadline and cancel are checked between streamed pieces, and the read timeout bounds a stall.

`build_extender` puts a backend, the umT5 token counter and the cache together.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wanstream.prompting.extend import (
    DEFAULT_TIMEOUT_S,
    ExtendCancelled,
    ExtendError,
    ExtendTimeout,
    Messages,
    PromptCache,
    PromptExtender,
    default_cache_dir,
    umt5_counter,
)

if TYPE_CHECKING:
    from wanstream.models.text import PromptTokenizer

ENV_EXTENDER_KEY = "WANSTREAM_EXTENDER_API_KEY"
DEFAULT_ENDPOINT_MODEL = "gpt-4o-mini"
_GPU_MARGIN = 1024**3  # left free on the GPU beyond the model's weights and its activations
_SAMPLING = {"temperature": 0.7, "top_p": 0.9}


class LocalBackend:
    """A local causal LM folder (config.json, model.safetensors, tokenizer files with a chat template)."""

    def __init__(self, folder: str | Path, *, device: str = "auto") -> None:
        self.folder = Path(folder)
        self.requested_device = device
        weights = self.folder / "model.safetensors"
        size = weights.stat().st_size if weights.is_file() else 0
        # The folder's name and the weights' size tell models apart in the cache without hashing gigabytes.
        self._name = f"local:{self.folder.name}:{size}"
        self._model: Any = None
        self._tokenizer: Any = None
        self._load_lock = threading.Lock()
        self.device: str | None = None  # chosen at load

    @property
    def name(self) -> str:
        return self._name

    def load(self) -> None:
        """Load the tokenizer and the model (done by the first `complete`)."""
        with self._load_lock:
            if self._model is not None:
                return
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
            device = self._pick_device()
            dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
            try:
                tokenizer = AutoTokenizer.from_pretrained(str(self.folder), local_files_only=True)
                model = AutoModelForCausalLM.from_pretrained(
                    str(self.folder), local_files_only=True, **_dtype_kwarg(dtype)
                ).to(device)
            except Exception as exc:
                raise ExtendError(
                    f"{self.folder}: cannot load the prompt extender ({type(exc).__name__}: {exc}). "
                    "Run `wanstream download --with-prompt-extender --verify` to repair it."
                ) from exc
            if not getattr(tokenizer, "chat_template", None):
                raise ExtendError(
                    f"{self.folder}: the tokenizer has no chat template (not an instruct model)"
                )
            self._tokenizer = tokenizer
            self._model = model.eval().requires_grad_(False)
            self.device = device

    def _pick_device(self) -> str:
        import torch

        if self.requested_device != "auto":
            return self.requested_device
        if not torch.cuda.is_available():
            return "cpu"
        weights = self.folder / "model.safetensors"
        need = (weights.stat().st_size if weights.is_file() else 0) * 1.2 + _GPU_MARGIN
        free, _ = torch.cuda.mem_get_info()
        return "cuda" if free >= need else "cpu"

    def complete(
        self, messages: Messages, *, seed: int, max_new_tokens: int, deadline: float, cancel: threading.Event
    ) -> str:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        self.load()
        tokenizer, model = self._tokenizer, self._model
        inputs = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        inputs = {k: v.to(model.device) for k, v in inputs.items()}
        stopped: list[str] = []

        class _Bounds(StoppingCriteria):
            def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
                if cancel.is_set():
                    stopped.append("cancel")
                elif time.monotonic() >= deadline:
                    stopped.append("timeout")
                return torch.full(
                    (input_ids.shape[0],), bool(stopped), dtype=torch.bool, device=input_ids.device
                )

        devices = [model.device] if model.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.inference_mode():  # seeded, global RNG untouched
            torch.manual_seed(seed)
            out = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=True,
                **_SAMPLING,
                top_k=0,
                stopping_criteria=StoppingCriteriaList([_Bounds()]),
                pad_token_id=tokenizer.eos_token_id
                if tokenizer.pad_token_id is None
                else tokenizer.pad_token_id,
            )
        if stopped and stopped[0] == "cancel":
            raise ExtendCancelled("prompt extension cancelled")
        if stopped:
            raise ExtendTimeout("the prompt extender ran out of time; try again, or raise the timeout")
        return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def _dtype_kwarg(dtype: Any) -> dict[str, Any]:
    """`dtype=` (transformers >= 4.56), `torch_dtype=` before it (the range pyproject allows)."""
    import transformers
    from packaging.version import Version

    return {"dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype": dtype}


class OpenAIBackend:
    """Any endpoint speaking OpenAI's chat completions API (OpenAI, vLLM, llama.cpp, Ollama, LM Studio …)."""

    def __init__(
        self,
        url: str,
        *,
        model: str = DEFAULT_ENDPOINT_MODEL,
        api_key: str | None = None,
        transport: Any = None,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"--extender-url {url!r}: give an http(s) URL, e.g. https://api.openai.com/v1")
        self.url = url.rstrip("/")
        self.model = model
        self.api_key = api_key
        self.transport = transport  # tests: an httpx transport

    @property
    def name(self) -> str:
        return f"openai:{self.url}:{self.model}"

    def complete(
        self, messages: Messages, *, seed: int, max_new_tokens: int, deadline: float, cancel: threading.Event
    ) -> str:
        import httpx

        body = {
            "model": self.model,
            "messages": messages,
            "seed": seed,
            "max_tokens": max_new_tokens,
            "stream": True,
            **_SAMPLING,
        }
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        left = max(0.1, deadline - time.monotonic())
        timeout = httpx.Timeout(left, connect=min(left, 10.0))
        pieces: list[str] = []
        try:
            with (
                httpx.Client(timeout=timeout, transport=self.transport) as client,
                client.stream("POST", f"{self.url}/chat/completions", json=body, headers=headers) as response,
            ):
                if response.status_code != 200:
                    response.read()
                    raise ExtendError(self._http_problem(response))
                for line in response.iter_lines():
                    if cancel.is_set():
                        raise ExtendCancelled("prompt extension cancelled")
                    if time.monotonic() >= deadline:
                        raise ExtendTimeout(f"{self.url} did not finish in time")
                    if self._piece(line, pieces):
                        break
        except httpx.TimeoutException as exc:
            raise ExtendTimeout(f"{self.url} did not answer in time ({type(exc).__name__})") from exc
        except httpx.HTTPError as exc:
            raise ExtendError(f"cannot reach {self.url}: {type(exc).__name__}: {exc}") from exc
        return "".join(pieces)

    @staticmethod
    def _piece(line: str, pieces: list[str]) -> bool:
        """Append one server-sent event's text; True at the end of the stream."""
        if not line.startswith("data:"):
            return False
        data = line[5:].strip()
        if data == "[DONE]":
            return True
        try:
            choice = json.loads(data)["choices"][0]
        except (ValueError, KeyError, IndexError, TypeError):
            raise ExtendError(
                f"the endpoint sent something that is not a chat completion chunk: {data[:200]!r}"
            ) from None
        delta = choice.get("delta") or choice.get("message") or {}
        if isinstance(delta.get("content"), str):
            pieces.append(delta["content"])
        return False

    def _http_problem(self, response: Any) -> str:
        detail = response.text[:300].strip()
        if response.status_code in (401, 403):
            return (
                f"{self.url} refused the request (HTTP {response.status_code}): set the API key in "
                f"{ENV_EXTENDER_KEY}. {detail}"
            )
        return f"{self.url} answered HTTP {response.status_code}: {detail}"


def build_extender(
    *,
    models_dir: str | Path | None = None,
    url: str | None = None,
    model: str | None = None,
    device: str = "auto",
    cache: bool | str | Path = True,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    tokenizer: PromptTokenizer | None = None,
) -> PromptExtender:
    """The local extender from the models folder, or (with `url`) an endpoint's; the umT5 tokenizer of the
    pipeline (or `tokenizer`: the one the running pipeline uses) counts tokens. Raises `MissingWeightsError`
    (saying the download command) when a file is missing; loads nothing heavy (the local model loads at its
    first use)."""
    from wanstream.weights.registry import get_pipeline
    from wanstream.weights.store import DEFAULT_PIPELINE, require_artifacts, resolve_prompt_extender
    from wanstream.weights.text import load_tokenizer

    if tokenizer is None:
        tokenizer_artifact = get_pipeline(DEFAULT_PIPELINE).artifact("tokenizer")
        tokenizer = load_tokenizer(require_artifacts([tokenizer_artifact], models_dir=models_dir)[0].path)
    backend: LocalBackend | OpenAIBackend
    if url:
        backend = OpenAIBackend(
            url, model=model or DEFAULT_ENDPOINT_MODEL, api_key=os.environ.get(ENV_EXTENDER_KEY)
        )
    else:
        backend = LocalBackend(resolve_prompt_extender(models_dir=models_dir), device=device)
    store = None if cache is False else PromptCache(default_cache_dir() if cache is True else Path(cache))
    return PromptExtender(backend, umt5_counter(tokenizer), cache=store, timeout_s=timeout_s)
