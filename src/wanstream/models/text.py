"""The umT5-XXL text encoder of Wan2.1, its prompt tokenizer, and the prompt → context step.

Parameter names follow `models_t5_umt5-xxl-enc-bf16.pth` (and the ComfyUI fp8 repack, which uses
the same names), so the official file loads with `strict=True`. The network is a T5 encoder with the
umT5 twist: every layer has its own relative-position bias table. Numerics follow the reference:
RMS-only layer norm (eps 1e-6, variance in float32), attention logits *not* scaled by 1/sqrt(d),
softmax in float32, padding keys masked with the dtype's most negative value, gated-GELU(tanh) FFN.

Three pieces, used in this order:

* `PromptTokenizer` — the reference's text cleaning (ftfy, html-unescape twice, collapse whitespace),
  `</s>` appended, right-padded / truncated to `text_len` (512); lengths come from the mask.
* `UMT5Encoder` — ids [B, L] + key mask → hidden states [B, L, dim].
* `TextEncoder` — prompts → context [B, text_len, dim] with rows past each prompt's length zeroed,
  exactly what StreamDiffusionV2 feeds the DiT (Wan2.1's trim-then-zero-pad gives the same tensor).
  It encodes only the real tokens: padding keys are masked and the bias depends only on offsets, so
  the valid rows do not depend on how much padding follows (a 40-token prompt costs 1/13 of 512).
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Protocol

import ftfy
import regex
import torch
import torch.nn.functional as F
from torch import nn

from wanstream.models.fp8 import embedding_rows

# The reference builder's argument names (`umt5_xxl(**kwargs)`), mapped to ours.
_CONFIG_ALIASES = {"vocab_size": "vocab", "encoder_layers": "num_layers", "max_dist": "max_distance"}


@dataclass(frozen=True)
class UMT5Config:
    """Constructor arguments of the umT5 encoder (defaults: umT5-XXL as Wan2.1 ships it)."""

    vocab: int = 256_384
    dim: int = 4096
    dim_attn: int = 4096  # q/k/v width: num_heads × head_dim
    dim_ffn: int = 10_240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32
    max_distance: int = 128
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.dim_attn % self.num_heads:
            raise ValueError(f"dim_attn {self.dim_attn} is not divisible by num_heads {self.num_heads}")
        if self.num_buckets % 2 or self.num_buckets < 4:
            raise ValueError(f"num_buckets {self.num_buckets} must be even and >= 4 (bidirectional buckets)")

    @property
    def head_dim(self) -> int:
        return self.dim_attn // self.num_heads

    @classmethod
    def umt5_xxl(cls) -> UMT5Config:
        return cls()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UMT5Config:
        """From a golden manifest's `model_config` or the reference `umt5_xxl(**kwargs)` arguments.

        Unknown keys (`class`, `dropout`, `note`, ...) are ignored; `shared_pos` must be false (a
        shared bias table is T5/mT5, not umT5, and has a different key layout).
        """
        if data.get("shared_pos", False):
            raise ValueError(
                "shared_pos=True (one bias table for all layers) is mT5, not umT5: not supported"
            )
        known = {f.name for f in fields(cls)}
        kwargs = {_CONFIG_ALIASES.get(k, k): v for k, v in data.items()}
        return cls(**{k: v for k, v in kwargs.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------------
class Linear(nn.Linear):
    """A bias-free linear layer whose weight may be stored narrower (fp8) than the activations.

    The weight is upcast to the input's dtype per call: fp8 storage halves the resident memory of
    the 5.7 B-parameter encoder at the cost of a transient full-width copy of one matrix at a time.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype))


class T5LayerNorm(nn.Module):
    """RMS norm without mean or bias; the variance is taken in float32 whatever the input dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)


def relative_position_buckets(
    length: int, num_buckets: int, max_distance: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """Bucket of (key − query) for every pair of `length` positions: long [length, length].

    Bidirectional: half the buckets for keys before (or at) the query, half for keys after. Within a
    half, offsets below a quarter of `num_buckets` get one bucket each; larger ones share
    log-spaced buckets up to `max_distance`, beyond which they all fall in the last bucket.
    """
    pos = torch.arange(length, device=device)
    rel = pos[None, :] - pos[:, None]
    half = num_buckets // 2
    exact = half // 2
    dist = rel.abs()
    # Same float32 operations, in the same order, as the reference: the bucket edges must agree.
    log_ratio = torch.log(dist.clamp_min(1).float() / exact) / math.log(max_distance / exact)
    far = (exact + (log_ratio * (half - exact)).long()).clamp_max(half - 1)
    return (rel > 0).long() * half + torch.where(dist < exact, dist, far)


class RelativePositionBias(nn.Module):
    """One learned scalar per (bucket, head); umT5 has one table per layer."""

    def __init__(self, num_buckets: int, num_heads: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def forward(self, buckets: torch.Tensor) -> torch.Tensor:
        """buckets [Lq, Lk] → additive bias [1, heads, Lq, Lk]."""
        return self.embedding.weight[buckets].permute(2, 0, 1).unsqueeze(0)


class Attention(nn.Module):
    def __init__(self, cfg: UMT5Config) -> None:
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.q = Linear(cfg.dim, cfg.dim_attn)
        self.k = Linear(cfg.dim, cfg.dim_attn)
        self.v = Linear(cfg.dim, cfg.dim_attn)
        self.o = Linear(cfg.dim_attn, cfg.dim)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x [B, L, dim]; bias [B or 1, heads, L, L] (relative position + key mask) → [B, L, dim]."""
        B, L, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(B, L, self.num_heads, self.head_dim).transpose(1, 2)

        # T5 folds the 1/sqrt(d) into its initialisation, so the logits are not scaled (scale=1).
        # SDPA keeps the softmax in float32 for half inputs, like the reference's explicit upcast.
        out = F.scaled_dot_product_attention(
            heads(self.q(x)), heads(self.k(x)), heads(self.v(x)), attn_mask=bias, scale=1.0
        )
        return self.o(out.transpose(1, 2).reshape(B, L, -1))


class FeedForward(nn.Module):
    """fc2(fc1(x) · GELU_tanh(gate(x))); `gate` is a Sequential so its key is `gate.0.weight`."""

    def __init__(self, cfg: UMT5Config) -> None:
        super().__init__()
        self.gate = nn.Sequential(Linear(cfg.dim, cfg.dim_ffn), nn.GELU(approximate="tanh"))
        self.fc1 = Linear(cfg.dim, cfg.dim_ffn)
        self.fc2 = Linear(cfg.dim_ffn, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x) * self.gate(x))


class Block(nn.Module):
    def __init__(self, cfg: UMT5Config) -> None:
        super().__init__()
        self.norm1 = T5LayerNorm(cfg.dim, cfg.eps)
        self.attn = Attention(cfg)
        self.norm2 = T5LayerNorm(cfg.dim, cfg.eps)
        self.ffn = FeedForward(cfg)
        self.pos_embedding = RelativePositionBias(cfg.num_buckets, cfg.num_heads)

    def forward(self, x: torch.Tensor, buckets: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        bias = self.pos_embedding(buckets).to(x.dtype)
        if key_mask is not None:
            # Replace (not add to) the bias of padding keys, as the reference does.
            bias = bias.masked_fill(~key_mask[:, None, None, :], torch.finfo(x.dtype).min)
        x = _fp16_clamp(x + self.attn(self.norm1(x), bias))
        return _fp16_clamp(x + self.ffn(self.norm2(x)))


def _fp16_clamp(x: torch.Tensor) -> torch.Tensor:
    """T5 activations overflow float16; keep them finite.

    The reference clamps only when an inf appeared (a host sync per layer); clamping always is
    sync-free and differs only for values within 1000 of float16's maximum.
    """
    if x.dtype != torch.float16:
        return x
    limit = torch.finfo(torch.float16).max - 1000
    return x.clamp(-limit, limit)


# ------------------------------------------------------------------------------------------------
# The encoder
# ------------------------------------------------------------------------------------------------
class UMT5Encoder(nn.Module):
    """umT5 encoder: token ids + key mask → final-normed hidden states (dropout is inference-off)."""

    def __init__(self, cfg: UMT5Config) -> None:
        super().__init__()
        self.config = cfg
        self.token_embedding = nn.Embedding(cfg.vocab, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = T5LayerNorm(cfg.dim, cfg.eps)

    @property
    def compute_dtype(self) -> torch.dtype:
        """Activation dtype: that of the norms, which are never stored in fp8 (the matrices may be)."""
        return self.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        # Gather first, then upcast: with an fp8 table only B×L rows are widened.
        return embedding_rows(self.token_embedding, ids, self.compute_dtype)

    def buckets(self, length: int) -> torch.Tensor:
        cfg = self.config
        return relative_position_buckets(length, cfg.num_buckets, cfg.max_distance, self.device)

    def forward(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        hidden_states: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """ids [B, L] long; mask [B, L] (nonzero = real token) or None → [B, L, dim].

        Padding positions are masked as keys only: their own rows are still computed (and non-zero).
        `hidden_states`, when given, receives each block's output (before the final norm).
        """
        if ids.dim() != 2:
            raise ValueError(f"ids must be [batch, tokens], got shape {tuple(ids.shape)}")
        if mask is not None and mask.shape != ids.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} differs from ids shape {tuple(ids.shape)}")
        key_mask = None if mask is None else mask.to(self.device) != 0
        x = self.embed(ids.to(self.device))
        buckets = self.buckets(ids.shape[1])
        for block in self.blocks:
            x = block(x, buckets, key_mask)
            if hidden_states is not None:
                hidden_states.append(x)
        return self.norm(x)


# ------------------------------------------------------------------------------------------------
# Prompts → tokens → context
# ------------------------------------------------------------------------------------------------
_WHITESPACE = regex.compile(r"\s+")


def clean_prompt(text: str) -> str:
    """The reference's 'whitespace' cleaning: fix mojibake, unescape HTML twice, collapse whitespace."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return _WHITESPACE.sub(" ", text).strip()


class FastTokenizer(Protocol):
    """The part of a transformers fast tokenizer (`T5TokenizerFast` / v5 `T5Tokenizer`) we call."""

    is_fast: bool

    def __call__(self, text: list[str], **kwargs: Any) -> Any: ...


@dataclass(frozen=True)
class TokenizedPrompts:
    """ids and mask [B, text_len] (right-padded), lengths [B] = tokens incl. `</s>`."""

    ids: torch.Tensor
    mask: torch.Tensor
    lengths: torch.Tensor

    @classmethod
    def from_mask(cls, ids: torch.Tensor, mask: torch.Tensor) -> TokenizedPrompts:
        """Check that `mask` is right padding (ones, then zeros; at least one token) and take lengths."""
        if ids.dim() != 2 or mask.shape != ids.shape:
            raise ValueError(
                f"ids and mask must both be [batch, tokens]; got {tuple(ids.shape)} and {tuple(mask.shape)}"
            )
        lengths = (mask != 0).sum(1)
        prefix = torch.arange(ids.shape[1], device=mask.device)[None, :] < lengths[:, None]
        if not torch.equal(prefix, mask != 0):
            raise ValueError("mask must be right padding: 1 for each prompt's tokens, then 0")
        if bool((lengths == 0).any()):
            raise ValueError("a prompt has no tokens (mask all zero); every prompt needs at least </s>")
        return cls(ids, mask, lengths)


class PromptTokenizer:
    """Wraps a transformers fast tokenizer loaded from the `google/umt5-xxl` files.

    Produces exactly the ids and mask of Wan2.1's `HuggingfaceTokenizer(seq_len=512,
    clean='whitespace')`: cleaned text, `</s>` appended (kept when truncating), padded with `<pad>`
    on the right to `text_len`.
    """

    def __init__(self, tokenizer: FastTokenizer, text_len: int = 512) -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise TypeError(
                f"{type(tokenizer).__name__} is not a fast (tokenizers-backed) tokenizer; "
                "load the google/umt5-xxl folder with wanstream.weights.text.load_tokenizer"
            )
        if text_len < 2:
            raise ValueError(f"text_len must be at least 2 (a token and </s>), got {text_len}")
        self.tokenizer = tokenizer
        self.text_len = text_len

    def __call__(self, prompts: Sequence[str]) -> TokenizedPrompts:
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompts must be a non-empty list of strings")
        out = self.tokenizer(
            [clean_prompt(p) for p in prompts],
            padding="max_length",
            truncation=True,
            max_length=self.text_len,
            add_special_tokens=True,
            padding_side="right",
            return_attention_mask=True,
            return_tensors="pt",
        )
        return TokenizedPrompts.from_mask(out["input_ids"], out["attention_mask"])


class TextEncoder:
    """Prompts → the DiT's text context [B, text_len, dim], rows past each prompt's length zero.

    Device and dtype are the model's. Caching per prompt text is the engine's job.
    """

    def __init__(self, model: UMT5Encoder, tokenizer: PromptTokenizer) -> None:
        self.model = model
        self.tokenizer = tokenizer

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.compute_dtype

    def tokenize(self, prompts: Sequence[str]) -> TokenizedPrompts:
        tokens = self.tokenizer(prompts)
        # Checked on the host ids: an out-of-range index would be an opaque device assert later.
        # (Not at construction: how many ids a tokenizer reports varies across transformers versions.)
        top = int(tokens.ids.max())
        if top >= self.model.config.vocab:
            raise ValueError(
                f"the tokenizer produced id {top} but the encoder's vocabulary has {self.model.config.vocab} "
                "rows: tokenizer and checkpoint do not belong together"
            )
        return tokens

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """[B, text_len, dim]; the lengths are `tokenize(prompts).lengths`."""
        return self.encode_tokens(self.tokenize(prompts))

    __call__ = encode

    def encode_tokens(self, tokens: TokenizedPrompts, *, trim: bool = True) -> torch.Tensor:
        """Context for already tokenized prompts; see `encode_context`."""
        return encode_context(self.model, tokens, trim=trim)


@torch.no_grad()
def encode_context(
    model: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
    tokens: TokenizedPrompts,
    *,
    trim: bool = True,
) -> torch.Tensor:
    """StreamDiffusionV2's text context: [B, width, dim] with rows >= each length zero, width = ids'.

    `trim=True` runs the encoder over the longest prompt's tokens only, then zero-pads;
    `trim=False` runs all positions (the reference's cost) and zeroes the padding rows. Both give the
    same tensor up to float rounding. Wan2.1's per-prompt list is `context[b, :lengths[b]]`.
    `model` is a `UMT5Encoder` or anything called the same way (ids, mask) → hidden states.
    """
    ids, mask, lengths = tokens.ids, tokens.mask, tokens.lengths
    width = ids.shape[1]
    if trim:
        longest = int(lengths.max())  # one host sync per prompt batch, not per frame
        short = bool((lengths < longest).any())
        hidden = model(ids[:, :longest], mask[:, :longest] if short else None)
    else:
        hidden = model(ids, mask)
    keep = torch.arange(hidden.shape[1], device=hidden.device)[None, :] < lengths.to(hidden.device)[:, None]
    hidden = hidden.masked_fill(~keep[..., None], 0.0)
    return F.pad(hidden, (0, 0, 0, width - hidden.shape[1]))
