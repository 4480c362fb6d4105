"""The server's configuration: one frozen dataclass built by `wanstream serve` (or by tests)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

MiB = 1024 * 1024


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None  # required when `host` is not a loopback address
    max_sessions: int = 1  # concurrent streams (one GPU session by default)
    demo: bool = False  # tiny random-weight model: no download, runs on a CPU
    random_weights: bool = False  # full-size networks with RANDOM weights (measuring the live path)
    text_encoder: str = "auto"  # umT5 placement: auto | gpu | fp8 | host (docs/memory.md)
    precision: str = "bf16"  # the DiT's weights: bf16 | fp8 (float8 GEMMs where the GPU has them)
    models_dir: Path | None = None
    vace: bool = True  # load the VACE module when it is downloaded (streams opt in with "vace")
    device: str | None = None  # None: CUDA when available, else CPU
    gpus: int = 1  # > 1: one stream over GPUs 0..N-1, DiT blocks in a ring (docs/multigpu.md)
    preload: bool = True  # load the model at start-up (else on POST /api/v1/model/load)
    warm_up: bool = True  # after loading, a private stream at the default settings compiles what streams need
    media_dir: Path | None = None  # server-side videos for headless sessions and uploads
    lora_dir: Path | None = None  # LoRA files clients may name (nothing outside it is ever opened)
    recordings_dir: Path | None = None  # None: a private temp folder removed at shutdown
    take_log_mib: int = 4096  # each stream's session log (docs/replay.md): frames kept up to this; 0: no logs
    reproducible_takes: bool = False  # cuDNN's heuristics, Inductor's first configurations
    cors_origins: tuple[str, ...] = ()  # closed by default
    ice_servers: tuple[str, ...] = ()  # e.g. "stun:stun.l.google.com:19302"; none: host candidates only
    max_upload_bytes: int = 512 * MiB
    ice_timeout_s: float = 20.0  # a peer that has not connected by then is torn down
    disconnect_grace_s: float = 5.0  # how long a "disconnected" peer may take to come back
    headless_idle_s: float = 300.0  # a headless session nobody asks about for this long is stopped
    input_queue_frames: int = 32  # bounded: old frames are dropped, never waited for
    # Bounded. Frames wait here until their playout time (pacing.py): the queue holds the stream's delay at its
    # frame rate (stream batch at 4 steps: ≈ 0.6 s, 18 frames at 30 FPS), with room for a burst on top.
    output_queue_frames: int = 48
    text_fps: float = 16.0  # text mode plays at Wan's native content rate
    control_queue: int = 32  # pending live updates per session
    max_chunk_s: float = 5.0  # streams whose chunks would take longer here are refused (not real time)
    max_ice_candidates: int = 32  # trickled remote candidates per session
    ice_allow_link_local: bool = False  # link-local candidates (169.254/16: cloud metadata) are refused
    peer_timeout_s: float = 5.0  # a peer that answers no ICE consent check for this long is gone
    osc: bool = True  # OSC control over UDP (docs/control.md)
    osc_port: int | None = None  # None: the HTTP port's number (as Daydream Scope)
    osc_allow: tuple[str, ...] = ()  # exposed servers: senders trusted without the token
    settings_overrides: dict[str, object] = field(default_factory=dict)  # defaults for new sessions
    sinks: tuple[str, ...] = ()  # outputs every new session gets unless it names its own ("ts", "ndi:NAME")
    ndi_in: str | None = None  # an NDI source (name or HOST:PORT) restyled from start-up (a headless session)
    ndi_discovery: bool = True  # False: NDI by direct address only (no mDNS announcements or browsing)
