"""The triton backend: Triton kernels of every op (nit_kernels/triton/<op>.py).

On a GPU these are the portable fast path. On a CPU they run only under the Triton interpreter
(``TRITON_INTERPRET=1`` set before the first kernel launch), which is how CI verifies them.
Importing this package never queries a device.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from ..backends import FLOAT_DTYPES, Call

try:
    import triton  # noqa: F401
    _ERROR: Optional[str] = None
except Exception as e:
    _ERROR = f"triton is not importable ({type(e).__name__}: {e}); pip install 'nit-kernels[triton]'"


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def load_error() -> Optional[str]:
    if _ERROR is None and not (interpreting() or torch.cuda.is_available()):
        return "no CUDA device, and TRITON_INTERPRET=1 is not set (the interpreter runs Triton on CPU tensors)"
    return _ERROR


def refuse(call: Call) -> Optional[str]:
    if call.device.type == "cpu" and not interpreting():
        return "CPU tensors run under the Triton interpreter only (set TRITON_INTERPRET=1)"
    if call.device.type not in ("cpu", "cuda"):
        return f"needs CUDA tensors, got {call.device}"
    if call.dtype not in FLOAT_DTYPES:
        return f"dtype {call.dtype} is not supported (float32, float16, bfloat16)"
    return None


OPS: dict = {}
