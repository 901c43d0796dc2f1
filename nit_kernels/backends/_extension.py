"""The compiled extension ``nit_kernels._C``, shared by the cpu and cuda backends.

The schemas live in csrc/registration.cpp (library ``nit``); csrc/cpu and csrc/cuda register
kernels for the dispatch keys CPU and CUDA. Loading the extension here gives every ``nit::`` op
its fake kernel and autograd from the op contracts (nit_kernels/_autograd.py). A backend serves
an op when its dispatch key has a kernel for the op's fwd (``ops_with_kernel``).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .. import _autograd

NAMESPACE = "nit"

_C = None
IMPORT_ERROR: Optional[str] = None
try:
    from .. import _C  # noqa: F401  (loading the library registers the nit:: ops)
except ImportError as e:
    IMPORT_ERROR = (f"the C++ extension nit_kernels._C is not built ({e}); "
                    "build it with `pip install --no-build-isolation -e .`")

# the ops of csrc/registration.cpp that every compiled backend (cpu, cuda, cuda_sim) implements (an op
# added to the contracts in Python only is not one of them)
BUILT_OPS = _autograd.CORE_OPS
# ops of csrc/registration.cpp with kernels for some dispatch keys only (bias_gelu: CPU)
EXTRA_OPS = tuple(op for op in _autograd.EXTRA_BUILT_OPS
                  if _C is not None and hasattr(torch.ops.nit, _autograd.contract(op).fwd))


def has_kernel(name: str, dispatch_key: str) -> bool:
    return _C is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{name}", dispatch_key)


def ops_with_kernel(dispatch_key: str, operand: Callable = None) -> dict:
    """Op name -> kernel-interface function, for the ops with a `dispatch_key` kernel."""
    served = [op for op in BUILT_OPS + EXTRA_OPS if has_kernel(_autograd.contract(op).fwd, dispatch_key)]
    kwargs = {} if operand is None else {"operand": operand}
    return _autograd.kernel_interface(NAMESPACE, served, **kwargs)


if _C is not None:
    _autograd.register(NAMESPACE, lambda t: "cuda" if t.is_cuda else "cpu", BUILT_OPS + EXTRA_OPS)
