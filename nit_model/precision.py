"""Precision policy of training and sampling: ``fp32`` or ``bf16`` (autocast, fp32 master weights).

With ``bf16`` the matmuls (and the fused ops that receive bf16 activations) run in bfloat16 under
``torch.autocast`` while the parameters, gradients, AdamW state, EMA and checkpoints stay fp32.
It pays off where the hardware multiplies bf16 natively: CPUs with AMX-BF16 (Sapphire Rapids and
later; 300-740 GFLOP/s on 2 threads against 110-370 for fp32) or AVX512-BF16, and CUDA devices
with bf16 support (Ampere and later). Elsewhere torch emulates bf16 on CPUs (about 1 GFLOP/s on an
AVX2-only core), so :func:`default_precision` keeps fp32 there.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Optional, Union

import torch

__all__ = ["PRECISIONS", "PrecisionError", "cpu_bf16_flags", "bf16_support", "default_precision",
           "check_precision", "amp_dtype", "autocast"]

PRECISIONS = ("fp32", "bf16")


class PrecisionError(ValueError):
    """A precision that this device cannot run (the message says why and what to use instead)."""


@functools.lru_cache(maxsize=1)
def cpu_bf16_flags() -> frozenset:
    """The CPU's bf16 matrix/vector flags among amx_bf16 and avx512_bf16 (empty when none or unreadable)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split()) & {"amx_bf16", "avx512_bf16"}
    except OSError:
        pass
    return frozenset()


def _device(device: Union[str, torch.device, None]) -> torch.device:
    return torch.device("cpu") if device is None else torch.device(device)


def bf16_support(device: Union[str, torch.device, None] = None) -> tuple[bool, bool, str]:
    """(runs, native, why) for bf16 autocast on `device`: whether it runs at all, whether the hardware
    multiplies bf16 natively, and a short reason."""
    dev = _device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return False, False, "CUDA is not available"
        idx = dev.index if dev.index is not None else torch.cuda.current_device()
        cap = torch.cuda.get_device_capability(idx)
        if cap[0] >= 8:  # Ampere and later multiply bf16 on tensor cores
            return True, True, f"{torch.cuda.get_device_name(idx)} has bf16 tensor cores"
        return False, False, (f"{torch.cuda.get_device_name(idx)} (compute capability {cap[0]}.{cap[1]}) has no "
                              f"native bf16 (needs 8.0 or later); use fp32")
    if dev.type == "cpu":
        flags = cpu_bf16_flags()
        if "amx_bf16" in flags:
            return True, True, "the CPU has AMX-BF16 tiles"
        if "avx512_bf16" in flags:
            return True, True, "the CPU has AVX512-BF16"
        return True, False, "the CPU has no AMX-BF16 or AVX512-BF16 (torch emulates bf16 matmuls, far slower than fp32)"
    return False, False, f"bf16 autocast is not supported on device type {dev.type!r}"


def default_precision(device: Union[str, torch.device, None] = None) -> str:
    """"bf16" where the device multiplies bf16 natively (CPUs with AMX-BF16, CUDA devices with
    bf16 support), else "fp32"."""
    runs, native, _ = bf16_support(device)
    dev = _device(device)
    if dev.type == "cpu":  # AVX512-BF16 alone speeds up dot products less than AMX does the matmuls
        return "bf16" if "amx_bf16" in cpu_bf16_flags() else "fp32"
    return "bf16" if runs and native else "fp32"


def check_precision(precision: str, device: Union[str, torch.device, None] = None, *, where: str = "precision") -> str:
    """`precision` ("fp32", "bf16", or "auto" = :func:`default_precision`) resolved for `device`;
    PrecisionError (one line) when it is unknown or the device cannot run it."""
    if precision == "auto":
        return default_precision(device)
    if precision not in PRECISIONS:
        raise PrecisionError(f"{where} must be one of auto, {', '.join(PRECISIONS)}; got {precision!r}")
    if precision == "bf16":
        runs, _, why = bf16_support(device)
        if not runs:
            raise PrecisionError(f"{where}=bf16 cannot run on {_device(device)}: {why}")
    return precision


def amp_dtype(precision: str) -> Optional[torch.dtype]:
    """The autocast dtype of a resolved precision (None for fp32)."""
    return torch.bfloat16 if precision == "bf16" else None


def autocast(precision: str, device: Union[str, torch.device, None] = None):
    """``torch.autocast(device.type, bfloat16)`` for "bf16", a no-op context for "fp32"."""
    dtype = amp_dtype(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(_device(device).type, dtype=dtype)
