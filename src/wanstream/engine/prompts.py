"""Prompts: weighted blends, smooth transitions, and an embedding cache so no prompt is encoded twice.

Embeddings are umT5 outputs [1, 512, 4096] (rows past a prompt's length are zero). Blending and
interpolation work row by row (per token position):

* linear: the weighted sum, each row rescaled to the weighted average of the input rows' norms (a plain
  average of non-parallel vectors shrinks them; the DiT is sensitive to context magnitude);
* slerp (exactly two prompts): spherical interpolation per row, falling back to linear for (nearly)
  parallel or zero rows.

A transition to new prompts over K chunks uses the embeddings at t = 1/K, 2/K, …, 1 on the next K
chunks, starting from whatever was in force when it began (also mid-transition).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

Interpolation = Literal["linear", "slerp"]

# The product's one default prompt: what a stream started without prompts shows, and what `generate` uses
# without a timeline or prompts (the studio's store.js starts from the same text).
DEFAULT_PROMPT = "a cinematic oil painting, vivid colours, soft light, highly detailed"


class WeightedPrompt(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    text: str = Field(..., description="The prompt; long, detailed prompts work best.")
    weight: float = Field(1.0, ge=0.0, le=1000.0, description="Relative weight (normalised over prompts).")

    @field_validator("text")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("prompt text is empty")
        return v


class Transition(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    steps: int = Field(
        4, ge=0, le=256, description="Chunks over which to blend into the new prompts (0: at once)."
    )
    method: Interpolation = Field("linear", description="Temporal interpolation: 'linear' or 'slerp'.")


def normalize_weights(weights: Sequence[float]) -> list[float]:
    total = float(sum(weights))
    if total <= 0:
        return [1.0 / len(weights)] * len(weights)
    return [float(w) / total for w in weights]


def _row_norms(x: torch.Tensor) -> torch.Tensor:
    return x.float().norm(dim=-1, keepdim=True)


def lerp_rows(embeds: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Weighted sum per row, rescaled to the weighted mean of the rows' norms."""
    w = normalize_weights(weights)
    stacked = torch.stack([e.float() for e in embeds])  # [P, ..., T, D]
    wt = torch.tensor(w, dtype=torch.float32, device=stacked.device).view(-1, *([1] * (stacked.dim() - 1)))
    mixed = (stacked * wt).sum(0)
    target = (_row_norms(stacked) * wt).sum(0)
    norm = _row_norms(mixed)
    scale = torch.where(norm > 1e-8, target / norm.clamp_min(1e-8), torch.ones_like(norm))
    return (mixed * scale).to(embeds[0].dtype)


def slerp_rows(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation per row with linear magnitude; linear where rows are parallel or zero."""
    af, bf = a.float(), b.float()
    na, nb = _row_norms(af), _row_norms(bf)
    ua, ub = af / na.clamp_min(1e-8), bf / nb.clamp_min(1e-8)
    cos = (ua * ub).sum(-1, keepdim=True).clamp(-1.0, 1.0)
    omega = torch.arccos(cos)
    sin = torch.sin(omega)
    direction = (torch.sin((1 - t) * omega) * ua + torch.sin(t * omega) * ub) / sin.clamp_min(1e-8)
    magnitude = (1 - t) * na + t * nb
    lin = (1 - t) * af + t * bf
    ok = (omega.abs() > 1e-4) & (na > 1e-8) & (nb > 1e-8)
    return torch.where(ok, direction * magnitude, lin).to(a.dtype)


def blend(
    embeds: Sequence[torch.Tensor], weights: Sequence[float], method: Interpolation = "linear"
) -> torch.Tensor:
    """Blend several prompt embeddings by weight ('slerp' applies to exactly two prompts)."""
    if not embeds:
        raise ValueError("no prompts to blend")
    if len(embeds) == 1:
        return embeds[0]
    if method == "slerp" and len(embeds) == 2:
        w = normalize_weights(weights)
        return slerp_rows(embeds[0], embeds[1], w[1])
    return lerp_rows(embeds, weights)


def interpolate(a: torch.Tensor, b: torch.Tensor, t: float, method: Interpolation) -> torch.Tensor:
    if method == "slerp":
        return slerp_rows(a, b, t)
    return lerp_rows([a, b], [1 - t, t])


class EmbeddingCache:
    """text → embedding, bounded (LRU) so long sessions keep flat memory."""

    def __init__(self, encode: Callable[[list[str]], torch.Tensor], capacity: int = 64) -> None:
        self._encode = encode
        self._capacity = capacity
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.encoded = 0  # how many texts went through the encoder (tests check reuse)

    def get_many(self, texts: Sequence[str]) -> list[torch.Tensor]:
        missing = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if missing:
            fresh = self._encode(list(missing))
            self.encoded += len(missing)
            for text, emb in zip(missing, fresh):
                self._cache[text] = emb[None]
        out = []
        for text in texts:
            self._cache.move_to_end(text)
            out.append(self._cache[text])
        while len(self._cache) > self._capacity:
            self._cache.popitem(last=False)
        return out


@dataclass
class PromptChange:
    """What a prompt update asks of the stream (the session turns a refresh into a cut when the settings'
    prompt_switch says so)."""

    kind: Literal["none", "refresh", "transition"]
    chunks: int = 0


class PromptState:
    """The conditioning in force, and the queue of embeddings an ongoing transition will use."""

    def __init__(self) -> None:
        self.prompts: tuple[WeightedPrompt, ...] = ()
        self.embedding: torch.Tensor | None = None
        self._queue: list[torch.Tensor] = []
        self._target: torch.Tensor | None = None
        self.version = 0  # bumps whenever the embedding in force changes (→ new cross-attention K/V)

    @property
    def transition_left(self) -> int:
        return len(self._queue)

    def set(
        self,
        prompts: Sequence[WeightedPrompt],
        target: torch.Tensor,
        transition: Transition | None,
    ) -> PromptChange:
        prompts = tuple(prompts)
        first = self.embedding is None
        self.prompts = prompts
        if first or transition is None or transition.steps == 0:
            self._queue = []
            self._target = None
            self.embedding = target
            self.version += 1
            return PromptChange("none" if first else "refresh")
        source = self.embedding
        if (target.float() - source.float()).norm() < 0.01:  # nothing to blend towards
            self._queue, self._target = [], None
            self.embedding = target
            self.version += 1
            return PromptChange("refresh")
        K = transition.steps
        self._queue = [interpolate(source, target, (i + 1) / K, transition.method) for i in range(K)]
        self._target = target
        return PromptChange("transition", K)

    def advance(self) -> bool:
        """Called once per chunk: moves one step along a transition. True if the embedding changed."""
        if not self._queue:
            return False
        self.embedding = self._queue.pop(0)
        if not self._queue and self._target is not None:
            self.embedding, self._target = self._target, None
        self.version += 1
        return True

    def state(self) -> dict[str, Any]:
        """The prompts, the embedding in force, the transition's queue and the version (for snapshots)."""
        return {
            "prompts": self.prompts,
            "embedding": self.embedding,
            "queue": list(self._queue),
            "target": self._target,
            "version": self.version,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.prompts = state["prompts"]
        self.embedding = state["embedding"]
        self._queue = list(state["queue"])
        self._target = state["target"]
        self.version = state["version"]

    def describe(self) -> tuple[tuple[str, float], ...]:
        w = normalize_weights([p.weight for p in self.prompts]) if self.prompts else []
        return tuple((p.text, round(wi, 6)) for p, wi in zip(self.prompts, w))
