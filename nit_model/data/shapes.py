"""A procedural, class-conditional dataset of shapes at native sizes and aspect ratios.

Every item is one anti-aliased shape (the class) of random position, scale and rotation, rendered
at its own (H, W): in random colours on a two-colour gradient background, or white on black
(``palette="mono"``, what the CPU demo trains on). Sizes are multiples of the
model's pixel stride (the patch size), so NiT can pack them without resizing. The shape is scaled
by the image's shorter side, so a circle stays a circle on a 3:1 image: the class does not
depend on the aspect ratio, which is what a native-resolution model should learn.

Everything is a deterministic function of (seed, index), whatever the dataset length: sizes and
labels come from a vectorised counter-based hash of (seed, index) (`sizes()` never renders), the
rest of an item from a generator seeded with (seed, index).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

__all__ = ["SHAPE_CLASSES", "PALETTES", "ShapesDataset", "render_shape"]

SHAPE_CLASSES = ("circle", "square", "triangle", "cross", "ring", "stripes")
PALETTES = ("colour", "mono")

# Unit normals of an equilateral triangle's edges (pointing out), in the shape's rotated frame.
_TRI_NORMALS = np.array([[math.cos(a), math.sin(a)] for a in (math.pi / 2 + 2 * math.pi * k / 3 for k in range(3))])


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser (Steele et al. 2014) on uint64 arrays: a counter-based hash, so the
    draw for item i does not depend on how many items are drawn."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _uniform(seed: int, stream: int, index: np.ndarray) -> np.ndarray:
    """float64 in [0, 1) for every item index, independent per (seed, stream, index)."""
    key = _splitmix64(np.array([(seed % 2**61) * 8 + stream], dtype=np.uint64))
    return (_splitmix64(key ^ index) >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def _signed_distance(kind: str, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Approximate signed distance in pixels (negative inside) of a shape of radius r centred at
    0, in rotated coordinates (u, v). Exact near the edge, which is all the anti-aliasing needs."""
    if kind == "circle":
        return np.sqrt(u * u + v * v) - r
    if kind == "ring":
        return np.abs(np.sqrt(u * u + v * v) - 0.72 * r) - 0.24 * r
    au, av = np.abs(u), np.abs(v)
    if kind == "square":
        return np.maximum(au, av) - 0.78 * r
    if kind == "triangle":  # circumradius r, so the inradius is r / 2
        d = np.maximum(np.maximum(u * _TRI_NORMALS[0, 0] + v * _TRI_NORMALS[0, 1],
                                  u * _TRI_NORMALS[1, 0] + v * _TRI_NORMALS[1, 1]),
                       u * _TRI_NORMALS[2, 0] + v * _TRI_NORMALS[2, 1])
        return d - 0.5 * r
    if kind == "cross":
        arm = 0.26 * r
        return np.minimum(np.maximum(au - r, av - arm), np.maximum(au - arm, av - r))
    if kind == "stripes":  # a square cut into four bands along v
        period = 0.42 * r
        band = np.abs(np.mod(v, period) - 0.5 * period) - 0.25 * period
        return np.maximum(np.maximum(au, av) - 0.85 * r, band)
    raise ValueError(f"unknown shape {kind!r}; known: {', '.join(SHAPE_CLASSES)}")


def render_shape(kind: str, height: int, width: int, rng: np.random.Generator, *,
                 palette: str = "colour") -> np.ndarray:
    """Render one shape; float32 [3, height, width] in [0, 1].

    Radius 0.22-0.45 of the shorter side, centre anywhere the shape fits, any rotation.
    palette "colour": a random foreground on a random two-colour gradient background, differing
    from it by 0.3-0.7 in every channel so the shape is visible; "mono": white on black, the same
    geometry for the same rng state (the class is then most of what varies, which a small model
    learns several times faster).
    """
    if palette not in PALETTES:
        raise ValueError(f"unknown palette {palette!r}; choose one of {', '.join(PALETTES)}")
    m = min(height, width)
    r = rng.uniform(0.22, 0.45) * m
    cy = rng.uniform(r, height - r)
    cx = rng.uniform(r, width - r)
    theta = rng.uniform(0.0, 2.0 * math.pi)
    bg0 = rng.uniform(0.0, 1.0, 3)
    bg1 = np.clip(bg0 + rng.uniform(-0.15, 0.15, 3), 0.0, 1.0)
    fg = np.mod(bg0 + 0.5 + rng.uniform(-0.2, 0.2, 3), 1.0)
    gdir = rng.uniform(0.0, 2.0 * math.pi)
    if palette == "mono":  # the same draws, so geometry does not depend on the palette
        bg0 = bg1 = np.zeros(3)
        fg = np.ones(3)

    y = np.arange(height, dtype=np.float32)[:, None] + 0.5 - cy
    x = np.arange(width, dtype=np.float32)[None, :] + 0.5 - cx
    c, s = math.cos(theta), math.sin(theta)
    u = x * c + y * s
    v = y * c - x * s
    alpha = np.clip(0.5 - _signed_distance(kind, u, v, r), 0.0, 1.0)  # one-pixel anti-aliased edge
    g = np.clip(0.5 + (x * math.cos(gdir) + y * math.sin(gdir)) / (2.0 * max(height, width)), 0.0, 1.0)
    out = np.empty((3, height, width), dtype=np.float32)
    for ch in range(3):
        bg = bg0[ch] + (bg1[ch] - bg0[ch]) * g
        out[ch] = bg + (fg[ch] - bg) * alpha
    return out


class ShapesDataset(torch.utils.data.Dataset):
    """Synthetic class-conditional images of shapes at native sizes.

    Item i is ``(image, label)``: image float32 [3, H, W] in [-1, 1], label an int in
    ``[0, num_classes)`` naming ``classes[label]``.

    Sizes: the longer side is a multiple of `stride` drawn uniformly in [min_side, max_side]; the
    shorter side a multiple of `stride` drawn uniformly among those keeping
    ``longer / shorter <= max_aspect`` (and >= min_side); portrait or landscape with equal odds.
    So H and W are multiples of `stride` within [min_side, max_side] (rounded inward to the
    stride grid) and the aspect ratio lies in [1 / max_aspect, max_aspect].

    Args:
        num_items: dataset length.
        seed: selects the whole dataset; items are deterministic per (seed, index).
        min_side, max_side: side range in pixels.
        max_aspect: largest ratio of the longer to the shorter side (>= 1).
        stride: pixels per token side of the model (its patch size); sides are multiples of it.
        classes: subset/order of `SHAPE_CLASSES` to use (label = position in this tuple).
        palette: "colour" (random colours, gradient background) or "mono" (white on black); see
            `render_shape`.
    """

    def __init__(self, num_items: int = 10_000, *, seed: int = 0, min_side: int = 32, max_side: int = 128,
                 max_aspect: float = 3.0, stride: int = 8, classes: Sequence[str] = SHAPE_CLASSES,
                 palette: str = "colour"):
        if num_items < 1:
            raise ValueError(f"num_items must be >= 1, got {num_items}")
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        if max_aspect < 1:
            raise ValueError(f"max_aspect must be >= 1 (longer / shorter side), got {max_aspect}")
        kmin, kmax = -(-min_side // stride), max_side // stride
        if kmin < 1 or kmin > kmax:
            raise ValueError(f"no multiple of stride={stride} lies in [min_side={min_side}, max_side={max_side}]")
        if palette not in PALETTES:
            raise ValueError(f"unknown palette {palette!r}; choose one of {', '.join(PALETTES)}")
        classes = tuple(classes)
        unknown = [c for c in classes if c not in SHAPE_CLASSES]
        if not classes or unknown or len(set(classes)) != len(classes):
            raise ValueError(f"classes must be distinct names from {SHAPE_CLASSES}, got {classes}")
        self.num_items, self.seed, self.stride = int(num_items), int(seed), int(stride)
        self.min_side, self.max_side, self.max_aspect = int(min_side), int(max_side), float(max_aspect)
        self.classes, self.palette = classes, palette

        idx = np.arange(self.num_items, dtype=np.uint64)
        u_long, u_short, u_orient, u_label = (_uniform(self.seed, s, idx) for s in range(4))
        long_k = kmin + np.floor(u_long * (kmax - kmin + 1)).astype(np.int64)
        short_lo = np.maximum(np.ceil(long_k / self.max_aspect - 1e-9).astype(np.int64), kmin)
        short_k = short_lo + np.floor(u_short * (long_k - short_lo + 1)).astype(np.int64)
        portrait = u_orient < 0.5
        self._sizes = np.stack([np.where(portrait, long_k, short_k), np.where(portrait, short_k, long_k)], 1) * stride
        self._labels = np.floor(u_label * len(classes)).astype(np.int64)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return self.num_items

    def sizes(self) -> np.ndarray:
        """int64 [M, 2], (H, W) in pixels of every item, without rendering."""
        return self._sizes.copy()

    def labels(self) -> np.ndarray:
        """int64 [M], the class of every item."""
        return self._labels.copy()

    def _index(self, index) -> int:
        i = int(index)
        if i < 0:
            i += self.num_items
        if not 0 <= i < self.num_items:
            raise IndexError(f"index {index} out of range for a ShapesDataset of {self.num_items} items")
        return i

    def __getitem__(self, index) -> tuple[torch.Tensor, int]:
        i = self._index(index)
        h, w = (int(v) for v in self._sizes[i])
        label = int(self._labels[i])
        img = render_shape(self.classes[label], h, w, np.random.default_rng([self.seed, 1, i]), palette=self.palette)
        img *= 2.0  # to [-1, 1] in numpy: a torch op on >32k elements would wake its thread pool per item
        img -= 1.0
        return torch.from_numpy(img), label

    def __repr__(self) -> str:
        return (f"ShapesDataset({self.num_items} items, seed={self.seed}, sides {self.min_side}-{self.max_side} px, "
                f"max_aspect={self.max_aspect:g}, stride={self.stride}, classes={list(self.classes)}, "
                f"palette={self.palette!r})")
