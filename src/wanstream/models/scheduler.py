"""Flow-matching noise schedule (shift 8, 1000 steps) and the motion-aware noise controller's arithmetic.

The tables are built in float32 exactly as the reference builds them, so every lookup is bit-identical:
σ₀ = linspace(1, 0, 1001)[:-1], σ = 8σ₀ / (1 + 7σ₀), timesteps = 1000σ (from 1000 down to 7.94, no 0).
A timestep t is mapped to σ through the *nearest* grid timestep (first on ties). The DiT itself
receives the raw t.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch

# The authors' YAML step list; `--step N` keeps its first N non-zero entries.
BASE_STEP_LIST = (700, 500, 400, 200, 0)


class FlowMatchScheduler:
    def __init__(self, shift: float = 8.0, num_train_timesteps: int = 1000) -> None:
        self.shift = shift
        self.num_train_timesteps = num_train_timesteps
        # sigma_min 0, sigma_max 1, extra_one_step: linspace(1, 0, N + 1) without its last point.
        base = torch.linspace(1.0, 0.0, num_train_timesteps + 1)[:-1]
        self.sigmas = shift * base / (1 + (shift - 1) * base)
        self.timesteps = self.sigmas * num_train_timesteps
        self._device_tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    # --- lookups ---------------------------------------------------------------------------------
    def index(self, t: torch.Tensor) -> torch.Tensor:
        """Nearest grid index for each timestep (float32 arithmetic, as `add_noise` does)."""
        timesteps, _ = self._tables(t.device)
        return torch.argmin((timesteps[None] - t.reshape(-1, 1)).abs(), dim=1)

    def index_f64(self, t: torch.Tensor) -> torch.Tensor:
        """The same lookup in float64, as the flow→x0 conversion does it (identical for integer t)."""
        timesteps, _ = self._tables(t.device)
        return torch.argmin((timesteps.double()[None] - t.reshape(-1, 1).double()).abs(), dim=1)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """σ (float32) for each timestep."""
        _, sigmas = self._tables(t.device)
        return sigmas[self.index(t)]

    def sigma_of(self, t: float) -> float:
        """σ of one host-side timestep, without touching the device (cached)."""
        return _host_sigma(self, float(t))

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._device_tables:
            self._device_tables[device] = (self.timesteps.to(device), self.sigmas.to(device))
        return self._device_tables[device]

    # --- arithmetic ------------------------------------------------------------------------------
    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """(1 − σ)·x0 + σ·noise, σ per leading-dim sample (float32 math, result in noise's dtype)."""
        if not isinstance(t, torch.Tensor):
            # A host timestep: σ as a Python float (the float32 table value), no device tensor to make.
            s = self.sigma_of(t)
            return (x0.float() * (1 - s) + noise.float() * s).type_as(noise)
        sigma = self._sigma_for(t, x0)
        return ((1 - sigma) * x0 + sigma * noise).type_as(noise)

    def flow_to_x0(self, flow: torch.Tensor, xt: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """x0 = x_t − σ·flow, computed in float64 (the reference's precision), returned in flow's dtype."""
        if not isinstance(t, torch.Tensor):
            return (xt.double() - self.sigma_of(t) * flow.double()).to(flow.dtype)
        sigma = self._sigma_for(t, flow, f64=True)
        return (xt.double() - sigma * flow.double()).to(flow.dtype)

    def x0_to_flow(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        sigma = self._sigma_for(t, x0, f64=True)
        return ((xt.double() - x0.double()) / sigma).to(x0.dtype)

    def _sigma_for(self, t: torch.Tensor | float, like: torch.Tensor, f64: bool = False) -> torch.Tensor:
        """σ shaped to broadcast over `like` (one σ per sample of the leading dim, or one for all)."""
        if not isinstance(t, torch.Tensor):
            sigma = torch.tensor(self.sigma_of(t), dtype=torch.float64 if f64 else torch.float32)
            return sigma.to(like.device)
        _, sigmas = self._tables(t.device)
        idx = self.index_f64(t) if f64 else self.index(t)
        sigma = sigmas[idx].double() if f64 else sigmas[idx]
        return sigma.reshape(-1, *([1] * (like.dim() - 1))).to(like.device)


@lru_cache(maxsize=4096)
def _host_sigma(scheduler: FlowMatchScheduler, t: float) -> float:
    idx = int(torch.argmin((scheduler.timesteps - torch.tensor(t, dtype=torch.float32)).abs()))
    return float(scheduler.sigmas[idx])


def denoising_steps(
    num_steps: int, *, base: Sequence[int] = BASE_STEP_LIST, keep_final_zero: bool = False
) -> list[int]:
    """The reference's `--step N` selection: first N non-zero entries (plus the final 0 in t2v configs)."""
    nonzero = [t for t in base if t != 0]
    if not 1 <= num_steps <= len(nonzero):
        raise ValueError(f"steps must be between 1 and {len(nonzero)}, got {num_steps}")
    return nonzero[:num_steps] + ([0] if keep_final_zero else [])


def warp_steps(steps: Sequence[int], scheduler: FlowMatchScheduler) -> list[float]:
    """`warp_denoising_step`: t → cat(timesteps, [0])[1000 − t] (float32 values)."""
    table = torch.cat([scheduler.timesteps, torch.zeros(1)])
    return [float(table[scheduler.num_train_timesteps - int(t)]) for t in steps]


# ------------------------------------------------------------------------------------------------
# Motion-aware noise controller (StreamDiffusionV2 `compute_noise_scale_and_step`)
# ------------------------------------------------------------------------------------------------
MOTION_SCALE = 0.2  # RMS pixel difference (in [-1, 1] units) that counts as full motion
MOTION_RANGE = 0.1  # full motion lowers the target noise scale by this much
EMA = 0.9  # weight of the new target
KEEP = 0.1  # weight of the previous scale (a literal: 1 - 0.9 is not 0.1 in floating point)
STEP_OFFSET = 100  # the first timestep is int(1000·s) − 100


def chunk_motion(frames: torch.Tensor) -> torch.Tensor:
    """Normalised motion of a chunk, a device scalar in [0, 1].

    `frames` [B, C, T+1, H, W] in [-1, 1]: the previous chunk's last frame then the chunk's frames.
    Per frame, the RMS difference to its predecessor over (B, C, H, W); the max over frames / 0.2.
    """
    diff = (frames[:, :, 1:].float() - frames[:, :, :-1].float()) ** 2
    return (diff.mean(dim=(0, 1, 3, 4)).sqrt().max() / MOTION_SCALE).clamp(0, 1)


def controlled_noise_scale(motion: float, previous: float, initial: float) -> tuple[float, int]:
    """New noise scale and first timestep, in the reference's Python-float order of operations.

    Order matters near integers: a static chunk must give exactly `initial` (0.8 → step 700).
    """
    scale = (initial - MOTION_RANGE * motion) * EMA + previous * KEEP
    return scale, int(1000 * scale) - STEP_OFFSET


def controlled_noise_scale_device(
    motion: torch.Tensor, previous: torch.Tensor, initial: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`controlled_noise_scale` on float64 device scalars: the same IEEE operations, no host sync."""
    m = motion.double()
    scale = (initial - MOTION_RANGE * m) * EMA + previous.double() * KEEP
    return scale, torch.trunc(1000 * scale).long() - STEP_OFFSET


def first_step_for(noise_scale: float) -> int:
    """The timestep told to the DiT for input noised at `noise_scale` (≈ 0.1 below the real σ)."""
    return int(1000 * noise_scale) - STEP_OFFSET
