"""Frequency tables for axial 2D RoPE, with the resolution-extrapolation options of NiT.

The kernels consume only the [2, head_dim // 4] table (row a = the frequencies of axis a) and a
scalar ``mscale``. The methods follow the NiT/FiT VisionRotaryEmbedding options (Wang et al.,
"FiT: Flexible Vision Transformer for Diffusion Model", 2024; NiT, 2025), which in turn follow
position interpolation (Chen et al. 2023), NTK-aware scaling (bloc97, 2023) and YaRN
(Peng et al. 2023).
"""
from __future__ import annotations

import math
from typing import Sequence, Union

import torch

__all__ = ["rope_freqs", "rope_mscale", "ROPE_METHODS"]

ROPE_METHODS = ("normal", "linear", "ntk-aware", "ntk-aware-pro1", "ntk-aware-pro2", "ntk-by-parts",
                "yarn", "scale1", "scale2")

ScaleLike = Union[float, Sequence[float]]


def _base(d: int, theta: float) -> torch.Tensor:
    """theta ** (arange(0, d, 2) / d), fp32, as the official code computes it."""
    return theta ** (torch.arange(0, d, 2).float() / d)


def _correction_dim(num_rotations: float, d: int, theta: float, max_len: int) -> float:
    # dimension index at which a frequency completes `num_rotations` turns over max_len positions
    return (d * math.log(max_len / (num_rotations * 2 * math.pi))) / (2 * math.log(theta))


def _correction_range(low_rot: float, high_rot: float, d: int, theta: float, max_len: int):
    low = math.floor(_correction_dim(low_rot, d, theta, max_len))
    high = math.ceil(_correction_dim(high_rot, d, theta, max_len))
    return max(low, 0), min(high, d - 1)


def _ramp(low: float, high: float, n: int) -> torch.Tensor:
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    return ((torch.arange(n, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)


def _axis_freqs(d: int, theta: float, method: str, scale: float, ori_max_pe_len: int | None) -> torch.Tensor:
    s = max(float(scale), 1.0)  # scaling only ever stretches (official: clamp_min(scale, 1))
    if method in ("normal", "scale1", "scale2"):
        return 1.0 / _base(d, theta)
    if method == "linear":  # position interpolation
        return 1.0 / (s * _base(d, theta))
    if method in ("ntk-aware", "ntk-aware-pro1", "ntk-aware-pro2"):
        new_theta = theta * s ** (d / (d - 2))
        return 1.0 / _base(d, new_theta)
    if ori_max_pe_len is None:
        raise ValueError(f"rope method {method!r} needs ori_max_pe_len (the training-time max side in tokens)")
    extrapolation = 1.0 / _base(d, theta)
    interpolation = 1.0 / (s * _base(d, theta))
    if method == "yarn":
        low, high = _correction_range(32, 1, d, theta, ori_max_pe_len)
        keep = 1 - _ramp(low, high, d // 2)  # 1 where the frequency is extrapolated unchanged
        return interpolation * (1 - keep) + extrapolation * keep
    if method == "ntk-by-parts":
        ntk = 1.0 / _base(d, theta * s ** (d / (d - 2)))
        low, high = _correction_range(1.25, 0.75, d, theta, ori_max_pe_len)
        m = 1 - _ramp(low, high, d // 2)
        f = interpolation * (1 - m) + ntk * m
        low, high = _correction_range(16, 2, d, theta, ori_max_pe_len)
        m = 1 - _ramp(low, high, d // 2)
        return f * (1 - m) + extrapolation * m
    raise ValueError(f"unknown rope method {method!r}; choose one of {', '.join(ROPE_METHODS)}")


def rope_freqs(head_dim: int, *, theta: float = 10000.0, method: str = "normal", scale: ScaleLike = 1.0,
               ori_max_pe_len: int | None = None) -> torch.Tensor:
    """Per-axis angular frequencies, fp32 [2, head_dim // 4].

    "normal" is ``1 / theta ** (arange(0, d, 2) / d)`` with ``d = head_dim // 2`` for both axes.
    For extrapolation, ``scale`` is (max side at test time) / (max side in training), one float for
    both axes or a pair (axis 0, axis 1) for decoupled scaling; values below 1 are treated as 1.
    "yarn" and "ntk-by-parts" also need ``ori_max_pe_len`` (the training max side in tokens).
    Pair the table with ``rope_mscale`` for the methods that rescale magnitudes.
    """
    method = method.lower()
    if method not in ROPE_METHODS:
        raise ValueError(f"unknown rope method {method!r}; choose one of {', '.join(ROPE_METHODS)}")
    if head_dim <= 0 or head_dim % 4:
        raise ValueError(f"head_dim must be a positive multiple of 4 for axial 2D RoPE, got {head_dim}")
    scales = (scale, scale) if isinstance(scale, (int, float)) else tuple(scale)
    if len(scales) != 2:
        raise ValueError(f"scale must be a float or an (axis0, axis1) pair, got {scale!r}")
    d = head_dim // 2
    return torch.stack([_axis_freqs(d, float(theta), method, s, ori_max_pe_len) for s in scales]).float()


def rope_mscale(method: str, *, max_pe_len: tuple[int, int] | None = None, ori_max_pe_len: int | None = None) -> float:
    """Magnitude factor applied to the rotated q and k (``mscale`` of rope_2d).

    yarn: ``0.1 ln(s) + 1`` with s = max(h, w) / ori_max_pe_len (1 when s <= 1);
    ntk-aware-pro1 / scale1: ``sqrt(ln(2L) / ln(L0))`` with L = max(h, w), L0 = ori_max_pe_len;
    ntk-aware-pro2 / scale2: the same with L = h*w and L0 = ori_max_pe_len**2;
    1.0 for every other method. ``max_pe_len`` is the (h, w) in tokens at test time.
    """
    method = method.lower()
    if method not in ("yarn", "ntk-aware-pro1", "scale1", "ntk-aware-pro2", "scale2"):
        return 1.0
    if max_pe_len is None or ori_max_pe_len is None:
        raise ValueError(f"rope method {method!r} needs max_pe_len=(h, w) and ori_max_pe_len for its mscale")
    h, w = max_pe_len
    if method == "yarn":
        s = max(h, w) / ori_max_pe_len
        return 1.0 if s <= 1 else 0.1 * math.log(s) + 1.0
    if method in ("ntk-aware-pro1", "scale1"):
        test, train = 2 * max(h, w), ori_max_pe_len
    else:
        test, train = 2 * h * w, ori_max_pe_len ** 2
    return 1.0 if test / train <= 1 else math.sqrt(math.log(test) / math.log(train))
