"""Checks of user-supplied numbers, shared by the config, sampling and command-line layers.

Each raises ValueError saying what was expected and what came; NaN and infinities are refused
wherever a number is a setting (a scale, a rate, a count), since they would otherwise pass
comparisons such as ``v > 0`` silently (every comparison with NaN is False).
"""
from __future__ import annotations

import math
import numbers

__all__ = ["finite", "integer", "at_least", "error_line"]


def finite(name: str, value) -> float:
    """`value` as a float; ValueError unless it is a real, finite number."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v}")
    return v


def integer(name: str, value, minimum=None) -> int:
    """`value` as an int (an integral float is accepted); ValueError for anything else, NaN and
    infinities included, or when below `minimum`."""
    what = f"an integer >= {minimum}" if minimum is not None else "an integer"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    if isinstance(value, numbers.Integral):
        v = int(value)
    elif math.isfinite(float(value)) and float(value).is_integer():
        v = int(value)
    else:
        raise ValueError(f"{name} must be {what}, got {value!r}")
    if minimum is not None and v < minimum:
        raise ValueError(f"{name} must be {what}, got {v}")
    return v


def at_least(name: str, value, minimum: float) -> float:
    """A finite number >= `minimum`."""
    v = finite(name, value)
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum:g}, got {v:g}")
    return v


def error_line(e: BaseException) -> str:
    """One line for an exception: an OSError names its path; newlines become spaces."""
    if isinstance(e, OSError) and e.filename and e.strerror:
        msg = f"{e.filename}: {e.strerror}"
    else:
        msg = str(e) or type(e).__name__
    return " ".join(msg.split())
