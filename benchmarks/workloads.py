"""Realistic packs for benchmarks and demos, drawn from an ImageNet-like table of native sizes.

``assets/imagenet_like_sizes.csv`` holds 50,000 (height_px, width_px) pairs after NiT's
preprocessing rule (area capped at 2048^2, sides floored to multiples of 32). It approximates
ImageNet-1k's size distribution (mean about 170 tokens per image at stride 32, the NiT paper
reports about 171); it is not ImageNet itself.
"""
from __future__ import annotations

import csv
import functools
import os
from typing import Optional

import numpy as np

__all__ = ["imagenet_like_sizes_px", "imagenet_like_pack", "ASSET_CSV"]

ASSET_CSV = os.path.join(os.path.dirname(__file__), "assets", "imagenet_like_sizes.csv")


@functools.lru_cache(maxsize=4)
def imagenet_like_sizes_px(path: Optional[str] = None) -> np.ndarray:
    """int64 [M, 2] of (height_px, width_px)."""
    path = path or ASSET_CSV
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or rows[0] != ["height_px", "width_px"]:
        raise ValueError(f"{path}: expected a CSV with header height_px,width_px")
    return np.asarray([[int(h), int(w)] for h, w in rows[1:]], dtype=np.int64)


def imagenet_like_pack(token_budget: int, *, stride: int = 32, seed: int = 0, path: Optional[str] = None,
                       max_side: Optional[int] = None) -> list[tuple[int, int]]:
    """(h, w) token sizes of images drawn at random until the next would overflow `token_budget`.

    stride: pixels per token side (VAE factor x patch size; 32 for DC-AE f32 with patch 1).
    max_side: optional cap on a side in tokens (images above it are skipped).
    """
    px = imagenet_like_sizes_px(path)
    tok = px // stride
    tok = tok[(tok > 0).all(1)]
    if max_side is not None:
        tok = tok[(tok <= max_side).all(1)]
    rng = np.random.default_rng(seed)
    out, used = [], 0
    for i in rng.permutation(len(tok)):
        h, w = int(tok[i, 0]), int(tok[i, 1])
        if used + h * w > token_budget:
            if out:
                break
            continue
        out.append((h, w))
        used += h * w
    return out
