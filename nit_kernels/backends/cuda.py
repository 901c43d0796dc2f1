"""The cuda backend: the kernels of csrc/cuda (``nit::`` ops, dispatch key CUDA).

The attention kernels read token and head strides and need only a contiguous last dim, so a
``qkv.unbind`` view is passed as it is; every other tensor is made contiguous.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from ..dispatch import FLOAT_DTYPES, Call
from . import _extension
from ._extension import BUILT_OPS  # noqa: F401  (cuda_sim builds the same ops)

LIMIT_OPS = ("varlen_attention", "qk_norm_rope")  # the order of the results of op limits()


@functools.cache
def head_dim_limits() -> dict:
    """head_dim limits of the CUDA kernels, stated once in csrc/cuda/launchers.h and reported by
    the extension's op ``nit::limits`` (CPU-only builds included); cuda_sim runs the same kernels
    and its glue checks the same values. Empty when the extension is not loaded."""
    if _extension.IMPORT_ERROR is not None:
        return {}
    return dict(zip(LIMIT_OPS, torch.ops.nit.limits()))


def operand(op: str, t: torch.Tensor) -> torch.Tensor:
    """A tensor as the CUDA kernels take it (also those of cuda_sim)."""
    if op == "varlen_attention" and (t.shape[-1] <= 1 or t.stride(-1) == 1):
        return t
    return t.contiguous()


DEVICE_TYPE = "cuda"
OPS = _extension.ops_with_kernel("CUDA", operand)


def load_error() -> Optional[str]:
    if _extension.IMPORT_ERROR is not None:
        return _extension.IMPORT_ERROR
    if not OPS:
        return "nit_kernels._C was built without CUDA kernels (CPU-only torch or NIT_BUILD_CUDA=0)"
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    return None


def refuse_kernel(call: Call) -> Optional[str]:
    """Why the CUDA kernels cannot run `call` whatever the device (None if they can)."""
    if call.dtype not in FLOAT_DTYPES:
        return f"dtype {call.dtype} is not supported (float32, float16, bfloat16)"
    # grouped-query attention is supported
    limit = head_dim_limits().get(call.op)
    if limit is not None and call.head_dim is not None and call.head_dim > limit:
        return f"the CUDA {call.op} kernel supports head_dim <= {limit}, got {call.head_dim}"
    return None


refuse = refuse_kernel
