"""The cpu backend: the OpenMP + vectorised kernels of csrc/cpu (``nit::`` ops, dispatch key CPU).

Every op (and bias_gelu, which has a CPU kernel only), every head_dim, causal or not, grouped-query
heads; float32, float16 and bfloat16 (math in fp32). The kernels take contiguous tensors.
"""
from __future__ import annotations

from typing import Optional

from ..dispatch import FLOAT_DTYPES, Call
from . import _extension

DEVICE_TYPE = "cpu"
OPS = _extension.ops_with_kernel("CPU")


def load_error() -> Optional[str]:
    return _extension.IMPORT_ERROR


def refuse(call: Call) -> Optional[str]:
    if call.dtype not in FLOAT_DTYPES:
        return f"dtype {call.dtype} is not supported (float32, float16, bfloat16)"
    return None
