"""The triton backend: Triton kernels of every op (nit_kernels/backends/triton/<family>.py).

On a GPU these are the portable fast path. On a CPU they run only under the Triton interpreter,
which is how CI verifies them: set ``TRITON_INTERPRET=1`` before this package is first imported
(``@triton.jit`` reads it when it decorates the kernels). Importing this package never queries a
device, and ``import nit_kernels`` works without Triton (the backend then reports why it is
unavailable).

The raw functions of each op contract (nit_kernels/_autograd.py), named like the ops, are
``torch.library`` ops of namespace ``nit_triton`` with the contract's schema, fake kernel and
autograd, so ``torch.compile(fullgraph=True)`` keeps them in the graph: a ``triton_op`` on a GPU
(the compiler sees the kernels), an opaque ``custom_op`` with the checking fake under the
interpreter.

Metadata: every op checks the cu_seqlens, sizes and max_seqlen it is given (direct op calls and
torch.compile skip the eager checks of nit_kernels.ops), reading them on the host once per pack
(see _checks.py); kernels launch under their inputs' device.

Determinism: the backward of the modulation ops reduces per-image gradients with atomics unless
``torch.use_deterministic_algorithms(True)`` is on, in which case it uses per-tile partial sums
and a fixed-order reduction (bitwise repeatable). Every other kernel is deterministic always.
"""
from __future__ import annotations

from typing import Optional

import torch

from ...dispatch import FLOAT_DTYPES, Call

# head dims the attention kernels accept (a power-of-two block plus a small tail inside the kernels)
MAX_ATTENTION_HEAD_DIM = 128

try:
    import triton  # noqa: F401
    _ERROR: Optional[str] = None
except Exception as e:
    _ERROR = f"triton is not importable ({type(e).__name__}: {e}); pip install 'nit-kernels[triton]'"

NAMESPACE = "nit_triton"
OPS: dict = {}
INTERPRETED = False


def _operand(op: str, t: torch.Tensor) -> torch.Tensor:
    return t if op in ("rope_2d", "qk_norm_rope", "varlen_attention") and t.dim() == 3 else t.contiguous()
if _ERROR is None:
    try:
        from ... import _autograd
        from . import adaln, attention, rope
        from ._common import INTERPRETED, USE_TRITON_OP
        for _fn in (*adaln.RAW, *rope.RAW, *attention.RAW):
            _autograd.define(NAMESPACE, _fn.__name__, _fn, triton=USE_TRITON_OP)
        # a triton_op is traced through its launcher: the fake kernels are for the interpreter's custom ops
        _autograd.register(NAMESPACE, "triton", _autograd.CORE_OPS, fakes=not USE_TRITON_OP)
        # the launchers take tensors with a contiguous last dim (they read token and head strides)
        OPS = _autograd.kernel_interface(NAMESPACE, _autograd.CORE_OPS, operand=_operand)
    except Exception as e:  # an incompatible triton or torch must not break `import nit_kernels`
        _ERROR = f"the Triton kernels failed to load ({type(e).__name__}: {e})"


def interpreting() -> bool:
    """True when the kernels were loaded for the Triton interpreter (they then run on CPU tensors)."""
    return _ERROR is None and INTERPRETED


def load_error() -> Optional[str]:
    if _ERROR is None and not (INTERPRETED or torch.cuda.is_available()):
        return ("no CUDA device, and the kernels were not loaded for the Triton interpreter "
                "(set TRITON_INTERPRET=1 before nit_kernels.triton is imported to run them on CPU tensors)")
    return _ERROR


def refuse(call: Call) -> Optional[str]:
    if call.device.type == "cpu" and not INTERPRETED:
        return ("CPU tensors run under the Triton interpreter only (set TRITON_INTERPRET=1 before "
                "nit_kernels.triton is imported)")
    if call.device.type == "cuda" and INTERPRETED:
        return ("the kernels were loaded for the Triton interpreter (TRITON_INTERPRET=1), which runs on CPU "
                "tensors; unset TRITON_INTERPRET to run CUDA tensors on the GPU")
    if call.device.type not in ("cpu", "cuda"):
        return f"needs CUDA tensors, got {call.device}"
    if call.dtype not in FLOAT_DTYPES:
        return f"dtype {call.dtype} is not supported (float32, float16, bfloat16)"
    if call.op == "varlen_attention" and call.head_dim is not None and call.head_dim > MAX_ATTENTION_HEAD_DIM:
        return f"head_dim {call.head_dim} is not supported (at most {MAX_ATTENTION_HEAD_DIM})"
    if call.op == "varlen_attention" and call.dtype == torch.bfloat16 and INTERPRETED:
        return ("bfloat16 attention is wrong under the Triton interpreter (its tl.dot multiplies the raw bf16 "
                "bits); use float16 or float32 on CPU, or run on a GPU")
    return None
