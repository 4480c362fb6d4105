"""The umT5 encoder parked in host memory, streamed onto the GPU one block at a time to encode a prompt.

The 11 GB encoder is needed only when a prompt changes. Kept on the GPU it costs as much as the rest of the
pipeline; kept in *pinned* host memory it reaches the GPU at full PCIe speed (≈ 0.23 s for all of it on an
H100, against ≈ 8 s from pageable memory). Streaming block by block, with the next block's copy running
on a side stream while this one computes, bounds the GPU memory it needs to about two blocks (≈ 0.8 GB for
umT5-XXL) instead of the whole encoder, so a prompt change never needs the whole encoder's room next to a
running stream. The token table (2 GB) never moves: the prompt's rows are gathered on the host.

The host tensors are never re-copied: each call makes device copies from them and drops the copies after.
They live in one flat buffer page-locked in place (see `pack_pinned`).
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Sequence

import torch
from torch import nn

from wanstream.models.fastpath import GATE
from wanstream.models.text import (
    PromptTokenizer,
    TextEncoder,
    TokenizedPrompts,
    UMT5Encoder,
    encode_context,
    relative_position_buckets,
)


class HostParked:
    """A module whose parameters and buffers live in host memory; `fetch` makes device copies and
    `attach(copies)` / `detach()` run the module on them and give it its host tensors back."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.slots: list[tuple[nn.Module, str, bool]] = []  # (owner, attribute, is_parameter)
        for owner in module.modules():
            self.slots += [(owner, name, True) for name, _ in owner.named_parameters(recurse=False)]
            self.slots += [(owner, name, False) for name, _ in owner.named_buffers(recurse=False)]
        self.host = [self._get(slot) for slot in self.slots]

    def _get(self, slot: tuple[nn.Module, str, bool]) -> torch.Tensor:
        owner, name, _ = slot
        return owner._parameters[name] if slot[2] else owner._buffers[name]  # type: ignore[return-value]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.host)

    def fetch(self, device: torch.device) -> list[torch.Tensor]:
        """Device copies of the host tensors (asynchronous from pinned memory, on the current stream)."""
        return [t.to(device, non_blocking=True) for t in self.host]

    def attach(self, copies: Sequence[torch.Tensor]) -> None:
        # Plain tensors in the parameter slots for the time of a call (no nn.Parameter is made: that would
        # fail on inference tensors); the module reads them as its attributes all the same.
        for (owner, name, is_param), t in zip(self.slots, copies):
            (owner._parameters if is_param else owner._buffers)[name] = t  # type: ignore[assignment]

    def detach(self) -> None:
        """Back to the host tensors (the very same objects: nothing is copied back)."""
        self.attach(self.host)


def pack_pinned(parts: list[HostParked], pin: bool) -> torch.Tensor:
    """Move every host tensor of `parts` into one flat host buffer (views of it replace them in their modules)
    and, with `pin`, page-lock that buffer in place (cudaHostRegister).

    One exact-size registration instead of a `pin_memory()` per tensor: torch's pinned allocator rounds every
    allocation up to a power of two, which would pin ≈ 1.4× the encoder (computed: an 80 MiB FFN matrix
    takes 128 MiB).
    Falls back to per-tensor pinning, with a warning, where registration is refused."""
    align = 64
    sizes = [-(-t.numel() * t.element_size() // align) * align for part in parts for t in part.host]
    flat = torch.empty(sum(sizes), dtype=torch.uint8)
    offset, k = 0, 0
    for part in parts:
        views = []
        for t in part.host:
            n = t.numel() * t.element_size()
            view = flat[offset : offset + n].view(t.dtype).view(t.shape)
            view.copy_(t)
            views.append(nn.Parameter(view, requires_grad=False) if isinstance(t, nn.Parameter) else view)
            offset += sizes[k]
            k += 1
        part.host = views
        part.detach()  # the module now holds the views; the original tensors are freed as we go
    if pin and flat.numel():
        try:
            torch.cuda.check_error(torch.cuda.cudart().cudaHostRegister(flat.data_ptr(), flat.numel(), 0))
        except (RuntimeError, AttributeError) as exc:
            import warnings

            warnings.warn(f"cudaHostRegister failed ({exc}); pinning tensor by tensor instead", stacklevel=2)
            for part in parts:
                part.host = [
                    nn.Parameter(t.data.pin_memory(), requires_grad=False)
                    if isinstance(t, nn.Parameter)
                    else t.pin_memory()
                    for t in part.host
                ]
                part.detach()
            return torch.empty(0, dtype=torch.uint8)  # the flat buffer goes with its last view
        weakref.finalize(flat, _unregister, flat.data_ptr())
    return flat


def _unregister(ptr: int) -> None:
    with contextlib.suppress(Exception):  # at interpreter exit CUDA may already be gone
        torch.cuda.cudart().cudaHostUnregister(ptr)


class HostTextEncoder(TextEncoder):
    """A `TextEncoder` whose umT5 stays in host memory and runs on `device` block by block, per prompt batch.

    Gives the same tensor as the encoder on `device` (the same kernels on the same inputs). Encodes one
    batch at a time (a lock): two streams changing prompts at once take turns rather than both holding
    blocks on the GPU."""

    def __init__(self, model: UMT5Encoder, tokenizer: PromptTokenizer, device: torch.device | str) -> None:
        super().__init__(model, tokenizer)
        self.target = torch.device(device)
        if model.device.type != "cpu":
            raise ValueError(f"the encoder to park must be in host memory, not on {model.device}")
        self.blocks = [HostParked(block) for block in model.blocks]
        self.tail = HostParked(model.norm)
        # The token table stays as it is (pageable): only the prompt's rows are gathered from it, on the host.
        self._flat = pack_pinned([*self.blocks, self.tail], pin=self.target.type == "cuda")
        self._lock = threading.Lock()

    @property
    def device(self) -> torch.device:
        return self.target

    @property
    def host_bytes(self) -> int:
        """Host memory the parked encoder holds (its blocks and norm; the token table is extra)."""
        return sum(b.nbytes for b in self.blocks) + self.tail.nbytes

    def encode_tokens(self, tokens: TokenizedPrompts, *, trim: bool = True) -> torch.Tensor:
        with self._lock, GATE.work():  # a CUDA-graph capture on another thread must not see these copies
            return encode_context(self._forward, tokens, trim=trim)

    @torch.no_grad()
    def _forward(self, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        model, device = self.model, self.target
        key_mask = None if mask is None else mask.to(device) != 0
        x = model.embed(ids.cpu()).to(device, non_blocking=True)
        cfg = model.config
        buckets = relative_position_buckets(ids.shape[1], cfg.num_buckets, cfg.max_distance, device)
        parts = [*self.blocks, self.tail]
        copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        pending = self._fetch(parts[0], copy_stream)
        for i, part in enumerate(parts):
            copies, ready = pending
            if ready is not None:
                torch.cuda.current_stream(device).wait_event(ready)
            if i + 1 < len(parts):  # the next part's copy overlaps this part's compute
                pending = self._fetch(parts[i + 1], copy_stream)
            part.attach(copies)
            try:
                x = part.module(x, buckets, key_mask) if part is not self.tail else part.module(x)
            finally:
                part.detach()
            if copy_stream is not None:  # made on the copy stream, used on this one: freed after this use
                for t in copies:
                    t.record_stream(torch.cuda.current_stream(device))
            del copies
        return x

    def _fetch(
        self, part: HostParked, copy_stream: torch.cuda.Stream | None
    ) -> tuple[list[torch.Tensor], torch.cuda.Event | None]:
        if copy_stream is None:
            return part.fetch(self.target), None
        with torch.cuda.stream(copy_stream):
            copies = part.fetch(self.target)
            ready = torch.cuda.Event()
            ready.record(copy_stream)
        return copies, ready
