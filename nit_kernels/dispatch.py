"""Dispatch: the one place that decides which backend runs an op, remembers it, and says why.

Order: the ``backend=`` argument, then the override (the environment variable
``NIT_KERNELS_BACKEND``, read once on the first selection, or ``set_override``), then automatic
choice. Automatic choice tries, for CUDA tensors, flash_attn (attention only), cuda, triton,
reference; for CPU tensors, cpu then reference. An explicitly requested backend that cannot serve
a call raises ``BackendUnavailable`` listing the reasons. The override names one backend for
every op it implements (ops it does not implement, e.g. adaln under ``flash_attn``, choose
automatically).

The choice is made once per (op, device type, dtype, head dim, grouped-query, causal, backend
argument) and cached; ``set_override`` clears the cache. ``cuda_sim`` is a test backend (the
CUDA kernels on CPU tensors in a simulator), used only when asked for by name.

Every backend provides, per op it implements, the kernel interface (see
nit_kernels/backends/reference.py for the math):

    adaln_modulate(x, shift, scale, cu_seqlens, eps) -> y
    gated_residual(x, y, gate, cu_seqlens) -> out
    residual_adaln(x, y, gate, shift, scale, cu_seqlens, eps) -> (x_new, h)
    rope_2d(q, k, cu_seqlens, sizes, freqs, positions, mscale) -> (q_rot, k_rot)
    qk_norm_rope(q, k, cu_seqlens, sizes, freqs, q_weight, q_bias, k_weight, k_bias, eps, positions, mscale)
    varlen_attention(q, k, v, cu_q, cu_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal) -> out
    bias_gelu(x, bias) -> y                         (reference and cpu only)

built from its raw fwd/bwd functions by nit_kernels/_autograd.py (one contract per op).
"""
from __future__ import annotations

import dataclasses
import importlib
import operator
import os
from typing import Callable, Optional

import torch

__all__ = [
    "OPS", "BACKENDS", "Call", "BackendUnavailable", "select", "kernel", "explain", "available_backends",
    "backends_report", "set_override", "override", "add_op",
]

OPS: tuple[str, ...] = ("adaln_modulate", "gated_residual", "residual_adaln", "rope_2d", "qk_norm_rope",
                        "varlen_attention", "bias_gelu")
BACKENDS = ("reference", "cpu", "cuda", "triton", "flash_attn", "cuda_sim")
TEST_BACKENDS = ("cuda_sim",)  # for tests only: usable when asked for, never chosen automatically
ENV_VAR = "NIT_KERNELS_BACKEND"
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot serve a call; the message lists why."""


@dataclasses.dataclass(frozen=True)
class Call:
    """What a backend needs to know to accept or refuse one call."""

    op: str
    device: torch.device
    dtype: torch.dtype
    head_dim: Optional[int] = None
    gqa: bool = False  # attention with fewer k/v heads than q heads
    causal: bool = False


class Backend:
    """A named implementation of (some of) the ops: the module nit_kernels/backends/<name>, loaded
    on first use. The module provides ``OPS`` (op -> kernel interface), ``load_error()`` and
    ``refuse(call)`` (None or why not); ops added later (``add_op``) join ``_ops``."""

    def __init__(self, name: str, module: str):
        self.name, self.module = name, module
        self._mod = None
        self._load_error: Optional[str] = None
        self._ops: dict = {}
        self._added: dict = {}
        self._loaded = False

    def _load(self):
        # Runs once; afterwards selection is plain dict and attribute reads, which torch.compile traces.
        if not self._loaded:
            try:
                self._mod = importlib.import_module(self.module, __package__)
                self._load_error = self._mod.load_error()
                self._ops = dict(self._mod.OPS) if self._load_error is None else {}
            except Exception as e:  # a broken optional dependency must not break import nit_kernels
                self._mod, self._load_error, self._ops = None, f"{type(e).__name__}: {e}", {}
            if self._load_error is None:
                self._ops.update(self._added)
            self._loaded = True
        return self._mod

    def load_error(self) -> Optional[str]:
        """Why this backend is unusable on this machine, or None."""
        self._load()
        return self._load_error

    def implements(self, op: str) -> bool:
        self._load()
        return op in self._ops

    def refuse(self, call: Call) -> Optional[str]:
        """Why this backend cannot run `call`, or None if it can."""
        self._load()
        device_type = getattr(self._mod, "DEVICE_TYPE", None)
        if device_type is not None and call.device.type != device_type:
            return f"needs {device_type} tensors, got {call.device}"
        if self._load_error is not None:
            return self._load_error
        if call.op not in self._ops:
            return f"{call.op} is not implemented by this backend"
        return self._mod.refuse(call)

    def impl(self, op: str) -> Callable:
        self._load()
        return self._ops[op]

    def add(self, op: str, fn: Callable) -> None:
        self._added[op] = fn
        if self._loaded and self._load_error is None:
            self._ops[op] = fn


_REGISTRY: dict[str, Backend] = {name: Backend(name, f".backends.{name}") for name in BACKENDS}


def get(name: str) -> Backend:
    if name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)} (or None for automatic)")
    return _REGISTRY[name]


def add_op(op: str, impls: dict[str, Callable]) -> None:
    """Make op `op` dispatchable: backend name -> its kernel-interface function. The reference
    must be among them (it serves every call the others refuse)."""
    if "reference" not in impls:
        raise ValueError(f"{op}: a new op needs a reference implementation, got backends {sorted(impls)}")
    for name in impls:
        get(name)
    global OPS
    if op not in OPS:
        OPS = OPS + (op,)
    for name, fn in impls.items():
        _REGISTRY[name].add(op, fn)
    _CHOSEN.clear()


# ---------------------------------------------------------------------------------------------
# override and cache
# ---------------------------------------------------------------------------------------------
_UNREAD = object()
_override = _UNREAD
_CHOSEN: dict[tuple, str] = {}  # (op, device type, dtype, head_dim, gqa, causal, backend) -> name


def set_override(name: Optional[str]) -> None:
    """Run every op a backend implements on `name` (None or "auto": automatic choice); this is
    what ``NIT_KERNELS_BACKEND`` sets at the first selection. Clears the cached choices."""
    global _override
    if name is not None and name != "auto":
        get(name)  # unknown names fail loudly
    _override = None if name in (None, "auto") else name
    _CHOSEN.clear()


def override() -> Optional[str]:
    """The backend override in force (None: automatic), reading ``NIT_KERNELS_BACKEND`` the first time."""
    if _override is _UNREAD:
        env = os.environ.get(ENV_VAR, "").strip()
        set_override(env or None)
    return _override


def _auto_order(call: Call) -> tuple[str, ...]:
    if call.device.type == "cuda":
        return ("flash_attn", "cuda", "triton", "reference")
    if call.device.type == "cpu":
        return ("cpu", "reference")
    return ("reference",)


def kernel(op: str, device: torch.device, dtype: torch.dtype, backend: Optional[str] = None, head_dim=None,
           gqa: bool = False, causal: bool = False) -> Callable:
    """The kernel-interface function of the backend that runs this call (cached choice)."""
    if torch.compiler.is_compiling():
        # head_dim is symbolic under torch.compile(dynamic=True) and assume_constant_result takes
        # only constants: operator.index specialises it (dynamo guards on its value, so another
        # head_dim recompiles and re-selects), where int() would keep it symbolic
        head_dim = None if head_dim is None else operator.index(head_dim)
        name = _select_name(op, device.type, dtype, head_dim, bool(gqa), bool(causal), backend)
    else:
        key = (op, device.type, dtype, head_dim, gqa, causal, backend)
        name = _CHOSEN.get(key)
        if name is None:
            name = _CHOSEN[key] = _choose(*key)
    return _REGISTRY[name]._ops[op]


def select(call: Call, backend: Optional[str] = None) -> tuple[str, Callable]:
    """The backend name and kernel-interface function that will run `call`."""
    head_dim = None if call.head_dim is None else operator.index(call.head_dim)
    name = _select_name(call.op, call.device.type, call.dtype, head_dim, bool(call.gqa), bool(call.causal), backend)
    return name, _REGISTRY[name]._ops[call.op]


# torch.compile runs the selection once while tracing and keeps its answer (a constant), so the
# graph holds only the chosen kernel; a later set_override does not re-trace.
@torch.compiler.assume_constant_result
def _select_name(op: str, device_type: str, dtype: torch.dtype, head_dim: Optional[int], gqa: bool,
                 causal: bool, backend: Optional[str]) -> str:
    key = (op, device_type, dtype, head_dim, gqa, causal, backend)
    name = _CHOSEN.get(key)
    if name is None:
        name = _CHOSEN[key] = _choose(*key)
    return name


def _choose(op: str, device_type: str, dtype: torch.dtype, head_dim: Optional[int], gqa: bool, causal: bool,
            backend: Optional[str]) -> str:
    call = Call(op, torch.device(device_type), dtype, head_dim, gqa, causal)
    requested, source = backend, "backend="
    forced = override() if requested is None else None
    if forced is not None and get(forced).implements(op):
        requested, source = forced, "override "
    if requested is not None:
        why = get(requested).refuse(call)
        if why is not None:
            usable = [n for n in _auto_order(call) if get(n).refuse(call) is None]
            raise BackendUnavailable(
                f"{op}: backend {requested!r} (from {source}{requested}) cannot run this call "
                f"(device={device_type}, dtype={dtype}"
                + (f", head_dim={head_dim}" if head_dim is not None else "")
                + f"): {why}. Usable for this call: {', '.join(usable)}; pass backend=None to choose automatically."
            )
        return requested
    for name in _auto_order(call):
        if get(name).refuse(call) is None:
            return name
    raise BackendUnavailable(f"{op}: no backend can run this call")  # reference serves every call


def explain(call: Call) -> dict[str, Optional[str]]:
    """For every backend, None if it can run `call`, else the reason it refuses."""
    return {name: get(name).refuse(call) for name in BACKENDS}


def available_backends() -> dict[str, Optional[str]]:
    """Backend name -> None if usable on this machine (for some device), else why not."""
    return {name: get(name).load_error() for name in BACKENDS}


def backends_report() -> str:
    """A table of every backend: usable here or not (and why), and which ops it implements."""
    lines = [f"{'backend':<11} {'status':<10} detail"]
    for name in BACKENDS:
        b = get(name)
        err = b.load_error()
        if err is None:
            ops = [op for op in OPS if b.implements(op)]
            note = " (test backend, never chosen automatically; built on first use)" if name in TEST_BACKENDS else ""
            lines.append(f"{name:<11} {'usable':<10} ops: {', '.join(ops) if ops else 'none built'}{note}")
        else:
            lines.append(f"{name:<11} {'no':<10} {err}")
    forced = override()
    lines.append(f"override: {forced} ({ENV_VAR} or set_override)" if forced else
                 f"{ENV_VAR} unset: automatic selection")
    return "\n".join(lines)
