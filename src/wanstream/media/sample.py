"""The built-in sample clip: a procedural video that needs no download.

It is made to exercise the streaming engine the way real footage does: a camera pan whose speed swells from
standstill to fast and back (the motion-aware noise controller sees both), moving and rotating shapes,
gradients and value-noise textures (detail for the VAE), and a hard scene cut every `SCENE_SECONDS` between
an outdoor and an indoor scene (the KV cache and its sink tokens must cope with a sudden change).

Frame i depends only on (i, height, width, fps): clips of different lengths share their prefix, and any
size works. An integer hash stands in for a random generator, so the clip is identical run to run.

Rendering is per frame and cheap: what pans (hills, grass, plaster) is drawn once into periodic "world"
strips and sampled at the camera offset; shapes are drawn only inside their bounding boxes. It is float32
numpy, single-threaded on purpose: a frame is a few dozen small array operations, and a thread pool's
barriers around each cost more than they save (badly so while the engine keeps the CPU busy).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
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
    out = np.empty((len(indices), height, width, 3), dtype=np.uint8)
    for j, i in enumerate(indices):
        out[j] = _render(i, height, width, fps)
    return torch.from_numpy(out)


def _render(index: int, height: int, width: int, fps: float) -> np.ndarray:
    t = index / fps
    world = _world(height, width)
    img = _outdoor(world, t) if _scene(t) % 2 == 0 else _indoor(world, t)
    return np.rint(np.clip(img, 0, 1) * 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------
# The two scenes. Lengths are in frame heights: y ∈ [0, 1] down, x ∈ [0, W/H] right.


def _outdoor(w: _World, t: float) -> np.ndarray:
    pan = _pan(t)
    img = w.sky.copy()  # sky gradient and a sun that does not move (far away)
    _sample_layer(img, w.hills, pan / 3)  # far hills, with parallax
    _sample_layer(img, w.grass, pan)  # textured grass fixed to the ground
    aspect = w.aspect
    # A striped signpost standing on the ground: it pans with it and comes round again.
    post_x = _wrap(1.3 - pan, aspect)
    _stamp(img, post_x, 0.68, 0.06, lambda dx, dy: (_BROWN, _box(dx, dy, 0.012, 0.05, 0.0, w.px)))

    def sign(dx: np.ndarray, dy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        stripes = (np.sin((dy - dx) * 90.0) > 0).astype(np.float32)
        return _mix(_WHITE, _SIGN_RED, stripes), _box(dx, dy, 0.09, 0.06, 0.0, w.px)

    _stamp(img, post_x, 0.58, 0.1, sign)
    # A red ball bouncing across the screen (its own motion, independent of the pan), shaded.
    r = 0.08
    bx = 0.25 * aspect + 0.22 * aspect * math.sin(0.9 * t)
    by = 0.84 - r - 0.40 * abs(math.sin(math.pi * 1.3 * t))

    def ball(dx: np.ndarray, dy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        light = np.clip(1.1 - 2.5 * np.sqrt((dx + 0.03) ** 2 + (dy + 0.03) ** 2), 0.3, 1)
        return light[..., None] * _BALL_RED, _disc(dx, dy, r, w.px)

    _stamp(img, bx, by, r, ball)
    # An orange square rolling along the ground.
    sx = _wrap(0.6 * aspect + 0.5 * t - pan, aspect)
    _stamp(img, sx, 0.86, 0.09, lambda dx, dy: (_ORANGE, _box(dx, dy, 0.06, 0.06, 2.2 * t, w.px)))
    return img


def _indoor(w: _World, t: float) -> np.ndarray:
    pan = _pan(t)
    aspect = w.aspect
    # Wall: a diagonal gradient under a checker tiling that pans the other way and breathes in and out, and
    # plaster texture. The checker is separable: parity of its column XOR parity of its row.
    zoom = 1.0 + 0.15 * math.sin(0.7 * t)
    cols = np.floor(((w.x - aspect / 2) / zoom + 0.8 * pan) * 8) % 2
    rows = np.floor((w.y - 0.5) / zoom * 8) % 2
    shade = np.where(cols != rows, np.float32(1.0), np.float32(0.75))
    plaster = _window(w.plaster, -0.8 * pan * w.height, w.width)
    img = w.wall * (shade[..., None] * plaster)
    # A pulsing ring in the middle.
    ring_r = 0.22 + 0.05 * math.sin(3.0 * t)

    def ring(dx: np.ndarray, dy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        band = np.abs(np.sqrt(dx * dx + dy * dy) - ring_r) - 0.025
        return _CYAN, np.clip(0.5 - band / w.px, 0, 1)

    _stamp(img, aspect / 2, 0.5, ring_r + 0.03, ring)
    # A yellow triangle spinning while it orbits the ring.
    ang = 1.1 * t
    tx, ty = aspect / 2 + 0.33 * math.cos(ang), 0.5 + 0.28 * math.sin(ang)
    _stamp(img, tx, ty, 0.1, lambda dx, dy: (_YELLOW, _triangle(dx, dy, 0.09, -3.0 * t, w.px)))
    # A marbled disc drifting diagonally, coming round again.
    dx0 = _wrap(0.2 + 0.3 * t, aspect)
    dy0 = 0.15 + 0.7 * ((0.23 * t) % 1.0)

    def marble(dx: np.ndarray, dy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        veins = _value_noise(dx * 25, dy * 25, seed=4)
        return _mix(_DEEP_BLUE, _PALE, veins), _disc(dx, dy, 0.1, w.px)

    _stamp(img, dx0, dy0, 0.1, marble)
    return img


# ---------------------------------------------------------------------------------------------------------
# What is drawn once per frame size: static backgrounds and the periodic world strips.


@dataclass(frozen=True)
class _Strip:
    """A layer that pans: one world period of columns, rows `top`..H, with its first W + 1 columns repeated
    at the end so the window seen at any offset is a plain slice."""

    top: int
    period: int  # columns per world period
    pixels: np.ndarray  # [H - top, period + W + 1, C]


@dataclass(frozen=True)
class _World:
    height: int
    width: int
    px: float  # one pixel, for one-pixel soft edges
    aspect: float
    x: np.ndarray  # [1, W] pixel-centre coordinates
    y: np.ndarray  # [H, 1]
    sky: np.ndarray  # [H, W, 3]
    wall: np.ndarray  # [H, W, 3]
    hills: _Strip  # RGBA
    grass: _Strip  # RGBA
    plaster: _Strip  # [H, ·, 1] brightness


@functools.lru_cache(maxsize=2)
def _world(height: int, width: int) -> _World:
    px = 1.0 / height
    aspect = width / height
    x = ((np.arange(width, dtype=np.float32) + 0.5) * px).reshape(1, -1)
    y = ((np.arange(height, dtype=np.float32) + 0.5) * px).reshape(-1, 1)
    period = WORLD_PERIOD * height
    # World x of one period of strip columns; sines make whole cycles per period so the strips tile.
    wx = ((np.arange(period, dtype=np.float32) + 0.5) * px).reshape(1, -1)
    cycle = 2 * math.pi / WORLD_PERIOD

    def strip(top: int, pixels: np.ndarray) -> _Strip:
        return _Strip(top, period, np.concatenate([pixels, pixels[:, : width + 1]], axis=1))

    sky = _mix(_rgb(0.10, 0.25, 0.65), _rgb(0.75, 0.88, 0.95), np.clip(y / 0.6, 0, 1))
    sky = np.broadcast_to(sky, (height, width, 3))
    sky = _over(sky, _rgb(1.0, 0.92, 0.6), _disc(x - 0.78 * aspect, y - 0.16, 0.07, 4 * px))

    top = int(0.44 * height)
    ys = y[top:]
    ridge = 0.52 - 0.05 * np.sin(2 * cycle * wx) - 0.025 * np.sin(5 * cycle * wx + 1.3)
    rgb = _mix(_rgb(0.22, 0.42, 0.30), _rgb(0.10, 0.28, 0.20), np.clip((ys - ridge) / 0.25, 0, 1))
    hills = strip(top, np.concatenate([rgb, _edge(ys - ridge, px)[..., None]], axis=-1))

    top = int(0.68 * height)
    ys = y[top:]
    line = 0.70 + 0.01 * np.sin(7 * cycle * wx)
    tex = 0.65 * _value_noise(wx * 24, ys * 40, seed=1, period=24 * WORLD_PERIOD)
    tex += 0.35 * _value_noise(wx * 90, ys * 150, seed=2, period=90 * WORLD_PERIOD)
    rgb = _mix(_rgb(0.20, 0.45, 0.12), _rgb(0.55, 0.75, 0.25), tex)
    grass = strip(top, np.concatenate([rgb, _edge(ys - line, px)[..., None]], axis=-1))

    wall = _mix(_rgb(0.30, 0.12, 0.45), _rgb(0.95, 0.60, 0.25), np.clip((x / aspect + y) / 2, 0, 1))
    plaster = 0.85 + 0.3 * _value_noise(wx * 60, y * 60, seed=3, period=60 * WORLD_PERIOD)
    return _World(height, width, px, aspect, x, y, sky, wall, hills, grass, strip(0, plaster[..., None]))


def _window(strip: _Strip, offset: float, width: int) -> np.ndarray:
    """The `[rows, W, C]` view of a strip panned by `offset` pixels (fractions interpolate linearly)."""
    whole = math.floor(offset)
    start, frac = whole % strip.period, np.float32(offset - whole)
    view = strip.pixels[:, start : start + width + 1]
    return _lerp(view[:, :-1], view[:, 1:], frac)


def _sample_layer(img: np.ndarray, layer: _Strip, offset: float) -> None:
    rgba = _window(layer, offset * img.shape[0], img.shape[1])
    img[layer.top :] = _over(img[layer.top :], rgba[..., :3], rgba[..., 3])


# ---------------------------------------------------------------------------------------------------------
# Drawing helpers: coverages in [0, 1] with a one-pixel soft edge; lengths in frame heights.

Shade = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def _stamp(img: np.ndarray, cx: float, cy: float, reach: float, shade: Shade) -> None:
    """Draw a shape centred at (cx, cy) that lies within `reach` of it, touching only its bounding box.

    `shade(dx, dy)` gets offsets from the centre (`[1, w]` and `[h, 1]`) and returns (colour, coverage).
    """
    height, width = img.shape[:2]
    x0, x1 = max(0, math.floor((cx - reach) * height) - 1), min(width, math.ceil((cx + reach) * height) + 1)
    y0, y1 = max(0, math.floor((cy - reach) * height) - 1), min(height, math.ceil((cy + reach) * height) + 1)
    if x0 >= x1 or y0 >= y1:
        return
    dx = ((np.arange(x0, x1, dtype=np.float32) + 0.5) / height - cx).reshape(1, -1)
    dy = ((np.arange(y0, y1, dtype=np.float32) + 0.5) / height - cy).reshape(-1, 1)
    color, coverage = shade(dx, dy)
    img[y0:y1, x0:x1] = _over(img[y0:y1, x0:x1], color, coverage)


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


def _rgb(r: float, g: float, b: float) -> np.ndarray:
    return np.array([r, g, b], dtype=np.float32)


# The shapes' colours.
_WHITE = _rgb(0.95, 0.95, 0.92)
_SIGN_RED = _rgb(0.85, 0.15, 0.12)
_BROWN = _rgb(0.35, 0.25, 0.15)
_BALL_RED = _rgb(0.9, 0.12, 0.1)
_ORANGE = _rgb(1.0, 0.55, 0.1)
_CYAN = _rgb(0.2, 0.85, 0.9)
_YELLOW = _rgb(0.98, 0.88, 0.15)
_DEEP_BLUE = _rgb(0.15, 0.2, 0.7)
_PALE = _rgb(0.9, 0.9, 1.0)


def _lerp(a: np.ndarray, b: np.ndarray, w: np.ndarray | np.float32) -> np.ndarray:
    return a + (b - a) * w


def _mix(a: np.ndarray, b: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Colour a where w = 0 to colour b where w = 1; w is [..., H, W], the result [..., H, W, 3]."""
    return _lerp(a, b, w[..., None])


def _over(img: np.ndarray, color: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    return _lerp(img, color, alpha[..., None])


def _edge(sdf: np.ndarray, px: float) -> np.ndarray:
    # Covered where sdf > 0 (below a line).
    return np.clip(0.5 + sdf / px, 0, 1)


def _disc(dx: np.ndarray, dy: np.ndarray, r: float, soft: float) -> np.ndarray:
    return np.clip(0.5 - (np.sqrt(dx * dx + dy * dy) - r) / soft, 0, 1)


def _box(dx: np.ndarray, dy: np.ndarray, hw: float, hh: float, angle: float, px: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    u, v = np.abs(c * dx + s * dy) - hw, np.abs(c * dy - s * dx) - hh
    outside = np.sqrt(np.maximum(u, 0) ** 2 + np.maximum(v, 0) ** 2) + np.minimum(np.maximum(u, v), 0)
    return np.clip(0.5 - outside / px, 0, 1)


def _triangle(dx: np.ndarray, dy: np.ndarray, r: float, angle: float, px: float) -> np.ndarray:
    # Equilateral triangle with inradius r/2: inside all three edge half-planes.
    angles = [angle + 2 * math.pi * k / 3 for k in range(3)]
    dist = np.maximum.reduce([dx * math.cos(a) + dy * math.sin(a) - r / 2 for a in angles])
    return np.clip(0.5 - dist / px, 0, 1)


def _hash(ix: np.ndarray, iy: np.ndarray, seed: int) -> np.ndarray:
    # Integer hash of lattice points → [0, 1); int64 arithmetic (wrapping) is exact and the same everywhere.
    h = (ix * 374761393 + iy * 668265263 + seed * 2147483647) & 0x7FFFFFFF
    h = ((h ^ (h >> 13)) * 1274126177) & 0x7FFFFFFF
    h = h ^ (h >> 16)
    return (h & 0xFFFF).astype(np.float32) / 65536.0


def _value_noise(u: np.ndarray, v: np.ndarray, seed: int, period: int | None = None) -> np.ndarray:
    """Smooth lattice noise in [0, 1] on the grid of column coordinates `u` [1, W] × row coordinates `v`
    [H, 1], as [H, W]; it tiles along u every `period` lattice cells if given.

    Separable coordinates let it hash only the lattice and interpolate columns, then rows.
    """
    u, v = u.reshape(-1), v.reshape(-1)
    iu, iv = np.floor(u), np.floor(v)
    fu, fv = u - iu, v - iv
    fu, fv = fu * fu * (3 - 2 * fu), fv * fv * (3 - 2 * fv)  # smoothstep
    iu, iv = iu.astype(np.int64), iv.astype(np.int64)
    u0, v0 = int(iu.min()), int(iv.min())
    lattice_u = np.arange(u0, int(iu.max()) + 2, dtype=np.int64)
    lattice_v = np.arange(v0, int(iv.max()) + 2, dtype=np.int64)
    if period is not None:
        lattice_u = lattice_u % period
    lattice = _hash(
        lattice_u.reshape(1, -1), lattice_v.reshape(-1, 1), seed
    )  # [rows, cols] of lattice points
    iu, iv = iu - u0, iv - v0
    cols = _lerp(lattice[:, iu], lattice[:, iu + 1], fu)  # [lattice rows, W]
    return _lerp(cols[iv], cols[iv + 1], fv.reshape(-1, 1))


def _check(num_frames: int, height: int, width: int, fps: float) -> None:
    if num_frames < 0:
        raise ValueError(f"num_frames must be ≥ 0, got {num_frames}")
    if height < 1 or width < 1:
        raise ValueError(f"size must be positive, got {height}×{width}")
    if not 0 < fps <= 1000:
        raise ValueError(f"fps must be in (0, 1000], got {fps}")
