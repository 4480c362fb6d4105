"""The built-in sample clip: a procedural video that needs no download.

It is made to exercise the streaming engine the way real footage does: a camera pan whose speed swells from
standstill to fast and back (the motion-aware noise controller sees both), moving and rotating shapes,
gradients and value-noise textures (detail for the VAE), and a hard scene cut every `SCENE_SECONDS` between
an outdoor and an indoor scene (the KV cache and its sink tokens must cope with a sudden change).

Frame i depends only on (i, height, width, fps): clips of different lengths share their prefix, and any
size works. Everything is float32 torch on the CPU with an integer hash instead of a random generator, so
the clip is identical run to run.

Rendering is per frame and cheap: what pans (hills, grass, plaster) is drawn once into periodic "world"
strips and sampled at the camera offset; shapes are drawn only inside their bounding boxes.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from wanstream.media.video import VideoWriter

SAMPLE_HEIGHT = 480  # the model's training size
SAMPLE_WIDTH = 832
SAMPLE_FPS = 16.0
SAMPLE_FRAMES = 81  # 5.06 s, the length of the reference's test clip
SCENE_SECONDS = 2.5  # a hard cut between the two scenes this often
PAN_PERIOD = 4.0  # seconds for the pan speed to swell and settle again
PAN_SPEED = 0.35  # peak pan speed, in frame heights per second
WORLD_PERIOD = 4  # the panning world repeats every 4 frame heights (its sines and noise lattices tile)

_BATCH = 8  # frames per piece in iter_sample_clip


def sample_clip(
    num_frames: int = SAMPLE_FRAMES,
    height: int = SAMPLE_HEIGHT,
    width: int = SAMPLE_WIDTH,
    fps: float = SAMPLE_FPS,
) -> torch.Tensor:
    """The whole clip as `[T, H, W, 3]` uint8."""
    _check(num_frames, height, width, fps)
    return render_frames(range(num_frames), height, width, fps)


def iter_sample_clip(
    num_frames: int = SAMPLE_FRAMES,
    height: int = SAMPLE_HEIGHT,
    width: int = SAMPLE_WIDTH,
    fps: float = SAMPLE_FPS,
    batch: int = _BATCH,
) -> Iterator[torch.Tensor]:
    """The clip in consecutive `[≤batch, H, W, 3]` uint8 pieces, rendered lazily (for long clips)."""
    _check(num_frames, height, width, fps)
    for start in range(0, num_frames, batch):
        yield render_frames(range(start, min(start + batch, num_frames)), height, width, fps)


def scene_cuts(num_frames: int, fps: float = SAMPLE_FPS) -> list[int]:
    """Indices of the frames that open a new scene (frame 0 excluded)."""
    _check(num_frames, 1, 1, fps)
    return [i for i in range(1, num_frames) if _scene(i / fps) != _scene((i - 1) / fps)]


def write_sample_clip(
    path: str | os.PathLike[str],
    num_frames: int = SAMPLE_FRAMES,
    height: int = SAMPLE_HEIGHT,
    width: int = SAMPLE_WIDTH,
    fps: float = SAMPLE_FPS,
) -> Path:
    """Write the clip as an H.264 MP4 (atomically) and return its path."""
    _check(num_frames, height, width, fps)
    with VideoWriter(path, fps) as out:
        for frames in iter_sample_clip(num_frames, height, width, fps):
            out.write(frames)
    return Path(path)


def render_frames(indices: range, height: int, width: int, fps: float) -> torch.Tensor:
    """Frames `indices` of the clip as `[T, H, W, 3]` uint8."""
    out = torch.empty(len(indices), height, width, 3, dtype=torch.uint8)
    for j, i in enumerate(indices):
        out[j] = render_frame(i, height, width, fps)
    return out


def render_frame(index: int, height: int, width: int, fps: float) -> torch.Tensor:
    """Frame `index` of the clip as `[H, W, 3]` uint8."""
    t = index / fps
    world = _world(height, width)
    img = _outdoor(world, t) if _scene(t) % 2 == 0 else _indoor(world, t)
    return img.clamp_(0, 1).mul_(255).round_().to(torch.uint8)


# ---------------------------------------------------------------------------------------------------------
# The two scenes. Lengths are in frame heights: y ∈ [0, 1] down, x ∈ [0, W/H] right.


def _outdoor(w: _World, t: float) -> torch.Tensor:
    pan = _pan(t)
    img = w.sky.clone()  # sky gradient and a sun that does not move (far away)
    _sample_layer(img, w.hills, pan / 3)  # far hills, with parallax
    _sample_layer(img, w.grass, pan)  # textured grass fixed to the ground
    aspect = w.aspect
    # A striped signpost standing on the ground: it pans with it and comes round again.
    post_x = _wrap(1.3 - pan, aspect)
    _stamp(img, post_x, 0.68, 0.06, lambda dx, dy: (_BROWN, _box(dx, dy, 0.012, 0.05, 0.0, w.px)))

    def sign(dx: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        stripes = (torch.sin((dy - dx) * 90.0) > 0).float()
        return _mix(_WHITE, _SIGN_RED, stripes), _box(dx, dy, 0.09, 0.06, 0.0, w.px)

    _stamp(img, post_x, 0.58, 0.1, sign)
    # A red ball bouncing across the screen (its own motion, independent of the pan), shaded.
    r = 0.08
    bx = 0.25 * aspect + 0.22 * aspect * math.sin(0.9 * t)
    by = 0.84 - r - 0.40 * abs(math.sin(math.pi * 1.3 * t))

    def ball(dx: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        light = (1.1 - 2.5 * torch.sqrt((dx + 0.03) ** 2 + (dy + 0.03) ** 2)).clamp(0.3, 1)
        return light.unsqueeze(-1) * _BALL_RED, _disc(dx, dy, r, w.px)

    _stamp(img, bx, by, r, ball)
    # An orange square rolling along the ground.
    sx = _wrap(0.6 * aspect + 0.5 * t - pan, aspect)
    _stamp(img, sx, 0.86, 0.09, lambda dx, dy: (_ORANGE, _box(dx, dy, 0.06, 0.06, 2.2 * t, w.px)))
    return img


def _indoor(w: _World, t: float) -> torch.Tensor:
    pan = _pan(t)
    aspect = w.aspect
    # Wall: a diagonal gradient under a checker tiling that pans the other way and breathes in and out, and
    # plaster texture. The checker is separable: parity of its column XOR parity of its row.
    zoom = 1.0 + 0.15 * math.sin(0.7 * t)
    cols = torch.floor(((w.x - aspect / 2) / zoom + 0.8 * pan) * 8).remainder_(2)
    rows = torch.floor((w.y - 0.5) / zoom * 8).remainder_(2)
    shade = (cols != rows).float().mul_(0.25).add_(0.75)
    plaster = _window(w.plaster, -0.8 * pan * w.height, w.width)
    img = w.wall * (shade.unsqueeze(-1) * plaster)
    # A pulsing ring in the middle.
    ring_r = 0.22 + 0.05 * math.sin(3.0 * t)

    def ring(dx: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        band = (torch.sqrt(dx * dx + dy * dy) - ring_r).abs() - 0.025
        return _CYAN, (0.5 - band / w.px).clamp(0, 1)

    _stamp(img, aspect / 2, 0.5, ring_r + 0.03, ring)
    # A yellow triangle spinning while it orbits the ring.
    ang = 1.1 * t
    tx, ty = aspect / 2 + 0.33 * math.cos(ang), 0.5 + 0.28 * math.sin(ang)
    _stamp(img, tx, ty, 0.1, lambda dx, dy: (_YELLOW, _triangle(dx, dy, 0.09, -3.0 * t, w.px)))
    # A marbled disc drifting diagonally, coming round again.
    dx0 = _wrap(0.2 + 0.3 * t, aspect)
    dy0 = 0.15 + 0.7 * ((0.23 * t) % 1.0)

    def marble(dx: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        veins = _value_noise(dx * 25, dy * 25, seed=4)
        return _mix(_DEEP_BLUE, _PALE, veins), _disc(dx, dy, 0.1, w.px)

    _stamp(img, dx0, dy0, 0.1, marble)
    return img


_WHITE = torch.tensor([0.95, 0.95, 0.92])
_SIGN_RED = torch.tensor([0.85, 0.15, 0.12])
_BROWN = torch.tensor([0.35, 0.25, 0.15])
_BALL_RED = torch.tensor([0.9, 0.12, 0.1])
_ORANGE = torch.tensor([1.0, 0.55, 0.1])
_CYAN = torch.tensor([0.2, 0.85, 0.9])
_YELLOW = torch.tensor([0.98, 0.88, 0.15])
_DEEP_BLUE = torch.tensor([0.15, 0.2, 0.7])
_PALE = torch.tensor([0.9, 0.9, 1.0])


# ---------------------------------------------------------------------------------------------------------
# What is drawn once per frame size: static backgrounds and the periodic world strips.


@dataclass(frozen=True)
class _Strip:
    """A layer that pans: one world period of columns, rows `top`..H, with its first W + 1 columns repeated
    at the end so the window seen at any offset is a plain slice."""

    top: int
    period: int  # columns per world period
    pixels: torch.Tensor  # [H - top, period + W + 1, C]


@dataclass(frozen=True)
class _World:
    height: int
    width: int
    px: float  # one pixel, for one-pixel soft edges
    aspect: float
    x: torch.Tensor  # [1, W] pixel-centre coordinates
    y: torch.Tensor  # [H, 1]
    sky: torch.Tensor  # [H, W, 3]
    wall: torch.Tensor  # [H, W, 3]
    hills: _Strip  # RGBA
    grass: _Strip  # RGBA
    plaster: _Strip  # [H, ·, 1] brightness


@functools.lru_cache(maxsize=2)
def _world(height: int, width: int) -> _World:
    px = 1.0 / height
    aspect = width / height
    x = ((torch.arange(width, dtype=torch.float32) + 0.5) * px).view(1, -1)
    y = ((torch.arange(height, dtype=torch.float32) + 0.5) * px).view(-1, 1)
    period = WORLD_PERIOD * height
    # World x of one period of strip columns; sines make whole cycles per period so the strips tile.
    wx = ((torch.arange(period, dtype=torch.float32) + 0.5) * px).view(1, -1)
    cycle = 2 * math.pi / WORLD_PERIOD

    def strip(top: int, pixels: torch.Tensor) -> _Strip:
        return _Strip(top, period, torch.cat([pixels, pixels[:, : width + 1]], dim=1).contiguous())

    sky = _mix(_rgb(0.10, 0.25, 0.65), _rgb(0.75, 0.88, 0.95), (y / 0.6).clamp(0, 1))
    sky = sky.expand(height, width, 3).clone()
    sky.lerp_(_rgb(1.0, 0.92, 0.6), _disc(x - 0.78 * aspect, y - 0.16, 0.07, 4 * px).unsqueeze(-1))

    top = int(0.44 * height)
    ys = y[top:]
    ridge = 0.52 - 0.05 * torch.sin(2 * cycle * wx) - 0.025 * torch.sin(5 * cycle * wx + 1.3)
    rgb = _mix(_rgb(0.22, 0.42, 0.30), _rgb(0.10, 0.28, 0.20), ((ys - ridge) / 0.25).clamp(0, 1))
    hills = strip(top, torch.cat([rgb, _edge(ys - ridge, px).unsqueeze(-1)], dim=-1))

    top = int(0.68 * height)
    ys = y[top:]
    line = 0.70 + 0.01 * torch.sin(7 * cycle * wx)
    tex = 0.65 * _value_noise(wx * 24, ys * 40, seed=1, period=24 * WORLD_PERIOD)
    tex += 0.35 * _value_noise(wx * 90, ys * 150, seed=2, period=90 * WORLD_PERIOD)
    rgb = _mix(_rgb(0.20, 0.45, 0.12), _rgb(0.55, 0.75, 0.25), tex)
    grass = strip(top, torch.cat([rgb, _edge(ys - line, px).unsqueeze(-1)], dim=-1))

    wall = _mix(_rgb(0.30, 0.12, 0.45), _rgb(0.95, 0.60, 0.25), ((x / aspect + y) / 2).clamp(0, 1))
    plaster = 0.85 + 0.3 * _value_noise(wx * 60, y * 60, seed=3, period=60 * WORLD_PERIOD)
    return _World(height, width, px, aspect, x, y, sky, wall, hills, grass, strip(0, plaster.unsqueeze(-1)))


def _window(strip: _Strip, offset: float, width: int) -> torch.Tensor:
    """The `[rows, W, C]` view of a strip panned by `offset` pixels (fractions interpolate linearly)."""
    whole = math.floor(offset)
    start, frac = whole % strip.period, offset - whole
    view = strip.pixels[:, start : start + width + 1]
    return torch.lerp(view[:, :-1], view[:, 1:], frac)


def _sample_layer(img: torch.Tensor, layer: _Strip, offset: float) -> None:
    rgba = _window(layer, offset * img.shape[0], img.shape[1])
    img[layer.top :].lerp_(rgba[..., :3], rgba[..., 3:])


# ---------------------------------------------------------------------------------------------------------
# Drawing helpers: coverages in [0, 1] with a one-pixel soft edge; lengths in frame heights.

Shade = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _stamp(img: torch.Tensor, cx: float, cy: float, reach: float, shade: Shade) -> None:
    """Draw a shape centred at (cx, cy) that lies within `reach` of it, touching only its bounding box.

    `shade(dx, dy)` gets offsets from the centre (`[1, w]` and `[h, 1]`) and returns (colour, coverage).
    """
    height, width = img.shape[:2]
    x0, x1 = max(0, math.floor((cx - reach) * height) - 1), min(width, math.ceil((cx + reach) * height) + 1)
    y0, y1 = max(0, math.floor((cy - reach) * height) - 1), min(height, math.ceil((cy + reach) * height) + 1)
    if x0 >= x1 or y0 >= y1:
        return
    dx = ((torch.arange(x0, x1, dtype=torch.float32) + 0.5) / height - cx).view(1, -1)
    dy = ((torch.arange(y0, y1, dtype=torch.float32) + 0.5) / height - cy).view(-1, 1)
    color, coverage = shade(dx, dy)
    img[y0:y1, x0:x1].lerp_(color, coverage.unsqueeze(-1))


def _scene(t: float) -> int:
    return math.floor(t / SCENE_SECONDS + 1e-9)


def _pan(t: float) -> float:
    # Position whose speed is PAN_SPEED·(1 − cos(2πt/P))/2: standstill at t = 0, P, 2P…, fastest between.
    w = 2 * math.pi / PAN_PERIOD
    return PAN_SPEED / 2 * (t - math.sin(w * t) / w)


def _wrap(pos: float, aspect: float, margin: float = 0.3) -> float:
    # Objects leaving one side come back on the other.
    span = aspect + 2 * margin
    return (pos + margin) % span - margin


def _rgb(r: float, g: float, b: float) -> torch.Tensor:
    return torch.tensor([r, g, b])


def _mix(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.lerp(a, b, w.unsqueeze(-1))


def _edge(sdf: torch.Tensor, px: float) -> torch.Tensor:
    # Covered where sdf > 0 (below a line).
    return (0.5 + sdf / px).clamp(0, 1)


def _disc(dx: torch.Tensor, dy: torch.Tensor, r: float, soft: float) -> torch.Tensor:
    return (0.5 - (torch.sqrt(dx * dx + dy * dy) - r) / soft).clamp(0, 1)


def _box(dx: torch.Tensor, dy: torch.Tensor, hw: float, hh: float, angle: float, px: float) -> torch.Tensor:
    c, s = math.cos(angle), math.sin(angle)
    u, v = (c * dx + s * dy).abs() - hw, (c * dy - s * dx).abs() - hh
    outside = torch.sqrt(u.clamp(min=0) ** 2 + v.clamp(min=0) ** 2) + torch.maximum(u, v).clamp(max=0)
    return (0.5 - outside / px).clamp(0, 1)


def _triangle(dx: torch.Tensor, dy: torch.Tensor, r: float, angle: float, px: float) -> torch.Tensor:
    # Equilateral triangle with inradius r/2: inside all three edge half-planes.
    edges = [
        dx * math.cos(a) + dy * math.sin(a) - r / 2 for a in (angle + 2 * math.pi * k / 3 for k in range(3))
    ]
    return (0.5 - torch.maximum(torch.maximum(edges[0], edges[1]), edges[2]) / px).clamp(0, 1)


def _hash(ix: torch.Tensor, iy: torch.Tensor, seed: int) -> torch.Tensor:
    # Integer hash of lattice points → [0, 1); int64 arithmetic is exact and the same everywhere.
    h = (ix * 374761393 + iy * 668265263 + seed * 2147483647) & 0x7FFFFFFF
    h = ((h ^ (h >> 13)) * 1274126177) & 0x7FFFFFFF
    h = h ^ (h >> 16)
    return (h & 0xFFFF).float() / 65536.0


def _value_noise(u: torch.Tensor, v: torch.Tensor, seed: int, period: int | None = None) -> torch.Tensor:
    """Smooth lattice noise in [0, 1] on the grid of column coordinates `u` [1, W] × row coordinates `v`
    [H, 1], as [H, W]; it tiles along u every `period` lattice cells if given.

    Separable coordinates let it hash only the lattice and interpolate columns, then rows.
    """
    u, v = u.reshape(-1), v.reshape(-1)
    iu, iv = torch.floor(u), torch.floor(v)
    fu, fv = u - iu, v - iv
    fu, fv = fu * fu * (3 - 2 * fu), fv * fv * (3 - 2 * fv)  # smoothstep
    u0, v0 = int(iu.min()), int(iv.min())
    lattice_u = torch.arange(u0, int(iu.max()) + 2)
    lattice_v = torch.arange(v0, int(iv.max()) + 2)
    if period is not None:
        lattice_u = lattice_u % period
    lattice = _hash(lattice_u.view(1, -1), lattice_v.view(-1, 1), seed)  # [rows, cols] of lattice points
    iu, iv = iu.long() - u0, iv.long() - v0
    cols = torch.lerp(lattice[:, iu], lattice[:, iu + 1], fu)  # [lattice rows, W]
    return torch.lerp(cols[iv], cols[iv + 1], fv.view(-1, 1))


def _check(num_frames: int, height: int, width: int, fps: float) -> None:
    if num_frames < 0:
        raise ValueError(f"num_frames must be ≥ 0, got {num_frames}")
    if height < 1 or width < 1:
        raise ValueError(f"size must be positive, got {height}×{width}")
    if not 0 < fps <= 1000:
        raise ValueError(f"fps must be in (0, 1000], got {fps}")
