"""Streaming encoders and decoders as the session sees them: frames ⇄ the DiT's latents.

Layouts at this boundary: frames [1, T, 3, H, W] in [-1, 1]; latents [1, F, 16, H/8, W/8] in the scale the
StreamDiffusionV2 DiT expects — the *raw* Wan posterior mean on the way in (its encode skips the latent
normalisation) and the *normalised* scale on the way out (the decoders take the DiT output as is). See
`wanstream.models.vae` for that asymmetry.

* Wan VAE: first chunk 5 frames → 2 latents → 5 frames, then 4 → 1 → 4 (causal-conv caches carried).
* TAEHV: the same counts (first decode drops 3 warm-up frames, upstream's convention); its encoder gives
  normalised latents, converted to raw μ for the DiT.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from wanstream.engine.components import Components
from wanstream.engine.settings import StreamSettings


class _Encoder(Protocol):
    def __call__(self, frames: torch.Tensor) -> torch.Tensor: ...
    def reset(self) -> None: ...


class _Decoder(Protocol):
    def __call__(self, latents: torch.Tensor) -> torch.Tensor: ...
    def reset(self) -> None: ...


class CodecMissing(RuntimeError):
    pass


@dataclass
class _WanEncoder:
    vae: Any  # wanstream.models.vae.WanVAE
    state: Any = None

    def __post_init__(self) -> None:
        from wanstream.models.vae import VAEEncodeState

        self.state = VAEEncodeState()

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        x = frames.transpose(1, 2).to(self._dtype)  # [1, 3, T, H, W]
        return self.vae.stream_encode(x, self.state).transpose(1, 2)  # raw μ [1, F, 16, h, w]

    @property
    def _dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def reset(self) -> None:
        self.state.reset()


@dataclass
class _WanDecoder:
    vae: Any
    state: Any = None

    def __post_init__(self) -> None:
        from wanstream.models.vae import VAEDecodeState

        self.state = VAEDecodeState()

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.transpose(1, 2).to(next(self.vae.parameters()).dtype)
        return self.vae.stream_decode(z, self.state).transpose(1, 2)  # [1, T, 3, H, W], clamped

    def reset(self) -> None:
        self.state.reset()


@dataclass
class _TaeEncoder:
    tae: Any  # wanstream.models.tae.TAEHV
    state: Any = None

    def __post_init__(self) -> None:
        from wanstream.models.tae import TAEEncodeState

        self.state = TAEEncodeState()

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        from wanstream.models.tae import wan_mu_from_taehv

        z = self.tae.stream_encode(frames.to(next(self.tae.parameters()).dtype), self.state)
        return wan_mu_from_taehv(z.float())

    def reset(self) -> None:
        self.state.reset()


@dataclass
class _TaeDecoder:
    tae: Any
    state: Any = None

    def __post_init__(self) -> None:
        from wanstream.models.tae import TAEDecodeState

        self.state = TAEDecodeState(warmup_frames=3)

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        return self.tae.stream_decode(latents.to(next(self.tae.parameters()).dtype), self.state)

    def reset(self) -> None:
        self.state.reset()


@dataclass
class Codecs:
    encoder: _Encoder | None
    decoder: _Decoder
    dtype: torch.dtype

    @classmethod
    def create(cls, components: Components, settings: StreamSettings) -> Codecs:
        def need(kind: str, module: Any, what: str) -> Any:
            if module is None:
                raise CodecMissing(
                    f"the {what} '{kind}' is not loaded; load it (e.g. `wanstream download --with-taehv`) "
                    f"or choose the other one"
                )
            return module

        encoder: _Encoder | None = None
        if settings.mode == "video":
            if settings.encoder == "wan":
                encoder = _WanEncoder(need("wan", components.wan_vae, "encoder"))
            else:
                encoder = _TaeEncoder(need("taehv", components.taehv, "encoder"))
        if settings.decoder == "wan":
            decoder: _Decoder = _WanDecoder(need("wan", components.wan_vae, "decoder"))
        else:
            decoder = _TaeDecoder(need("taehv", components.taehv, "decoder"))
        return cls(encoder, decoder, components.dtype)

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """frames [1, 3, T, H, W] (the session's layout) → latents [1, F, 16, h, w] for the DiT."""
        if self.encoder is None:
            raise CodecMissing("this session has no encoder (text mode)")
        return self.encoder(frames.transpose(1, 2)).to(self.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """DiT output [1, F, 16, h, w] → frames [1, T, 3, H, W] in [-1, 1]."""
        return self.decoder(latents)

    def reset(self) -> None:
        if self.encoder is not None:
            self.encoder.reset()
        self.decoder.reset()

    def state(self) -> dict[str, Any]:
        return {
            "encoder": None if self.encoder is None else self.encoder.state,  # type: ignore[attr-defined]
            "decoder": self.decoder.state,  # type: ignore[attr-defined]
        }

    def load_state(self, state: dict[str, Any]) -> None:
        if self.encoder is not None:
            self.encoder.state = state["encoder"]  # type: ignore[attr-defined]
        self.decoder.state = state["decoder"]  # type: ignore[attr-defined]
