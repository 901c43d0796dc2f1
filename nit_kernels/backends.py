"""Backend selection: the one place that decides which implementation runs an op, and says why.

Order: the ``backend=`` argument, then the environment variable ``NIT_KERNELS_BACKEND``, then
automatic choice. Automatic choice tries, for CUDA tensors, flash_attn (attention only), cuda,
triton, reference; for CPU tensors, cpu then reference. An explicitly requested backend that
cannot serve a call raises ``BackendUnavailable`` listing the reasons. ``NIT_KERNELS_BACKEND``
names one backend for every op it implements (ops it does not implement, e.g. adaln under
``flash_attn``, choose automatically).

``cuda_sim`` is a test backend: the CUDA kernels on CPU tensors in the SIMT simulator of
csrc/sim (nit_kernels/cuda_sim.py), used only when asked for by name.

Every backend provides the same kernel interface (see nit_kernels/reference.py for the spec):

    adaln_modulate(x, shift, scale, cu_seqlens, eps) -> y
    gated_residual(x, y, gate, cu_seqlens) -> out
    residual_adaln(x, y, gate, shift, scale, cu_seqlens, eps) -> (x_new, h)
    rope_2d(q, k, cu_seqlens, sizes, freqs, positions, mscale) -> (q_rot, k_rot)
    qk_norm_rope(q, k, cu_seqlens, sizes, freqs, q_weight, q_bias, k_weight, k_bias, eps, positions, mscale)
    varlen_attention(q, k, v, cu_q, cu_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal) -> out
"""
from __future__ import annotations

import dataclasses
import importlib
import operator
import os
from typing import Callable, Optional

import torch

__all__ = [
    "OPS", "BACKENDS", "Call", "BackendUnavailable", "select", "available_backends", "backends_report",
]

OPS = ("adaln_modulate", "gated_residual", "residual_adaln", "rope_2d", "qk_norm_rope", "varlen_attention")
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
    """A named implementation of (some of) the ops, loaded on first use."""

    name: str = ""
    module: str = ""

    def __init__(self):
        self._mod = None
        self._load_error: Optional[str] = None
        self._ops: dict = {}
        self._loaded = False

    def _load(self):
        # Runs once; afterwards selection is plain dict and attribute reads, which torch.compile traces.
        if not self._loaded:
            try:
                self._mod = importlib.import_module(self.module, __package__)
                self._load_error = self._find_load_error()
                self._ops = self._find_ops() if self._load_error is None else {}
            except Exception as e:  # a broken optional dependency must not break import nit_kernels
                self._mod, self._load_error, self._ops = None, f"{type(e).__name__}: {e}", {}
            self._loaded = True
        return self._mod

    def _find_load_error(self) -> Optional[str]:
        return self._mod.load_error()

    def _find_ops(self) -> dict:
        return dict(self._mod.OPS)

    def load_error(self) -> Optional[str]:
        """Why this backend is unusable on this machine, or None."""
        self._load()
        return self._load_error

    def implements(self, op: str) -> bool:
        self._load()
        return op in self._ops

    def refuse(self, call: Call) -> Optional[str]:
        """Why this backend cannot run `call`, or None if it can."""
        err = self.load_error()
        if err is not None:
            return err
        if call.op not in self._ops:
            return f"{call.op} is not implemented by this backend"
        return self._mod.refuse(call)

    def impl(self, op: str) -> Callable:
        self._load()
        return self._ops[op]


class _Reference(Backend):
    name, module = "reference", ".reference"

    def _find_load_error(self):
        return None

    def _find_ops(self):
        return {op: getattr(self._mod, op) for op in OPS}

    def refuse(self, call):
        self._load()
        return None


class _Cpp(Backend):
    """cpu and cuda: the ops of nit_kernels._C, one dispatch key each."""

    module = ".cpp"

    def __init__(self, name: str, dispatch_key: str, device_type: str):
        super().__init__()
        self.name, self.dispatch_key, self.device_type = name, dispatch_key, device_type

    def _find_load_error(self):
        return self._mod.device_error(self.dispatch_key)

    def _find_ops(self):
        return self._mod.ops_with_kernel(self.dispatch_key)

    def refuse(self, call):
        if call.device.type != self.device_type:
            return f"needs {self.device_type} tensors, got {call.device}"
        return super().refuse(call)


class _Triton(Backend):
    name, module = "triton", ".triton"


class _FlashAttn(Backend):
    name, module = "flash_attn", ".flash"


class _CudaSim(Backend):
    """The CUDA kernels on CPU tensors in the SIMT simulator (built on first call)."""

    name, module = "cuda_sim", ".cuda_sim"


_REGISTRY: dict[str, Backend] = {
    "reference": _Reference(),
    "cpu": _Cpp("cpu", "CPU", "cpu"),
    "cuda": _Cpp("cuda", "CUDA", "cuda"),
    "triton": _Triton(),
    "flash_attn": _FlashAttn(),
    "cuda_sim": _CudaSim(),
}


def get(name: str) -> Backend:
    if name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)} (or None for automatic)")
    return _REGISTRY[name]


def _auto_order(call: Call) -> tuple[str, ...]:
    if call.device.type == "cuda":
        return ("flash_attn", "cuda", "triton", "reference")
    if call.device.type == "cpu":
        return ("cpu", "reference")
    return ("reference",)


def select(call: Call, backend: Optional[str] = None) -> tuple[str, Callable]:
    """The backend name and kernel-interface function that will run `call`."""
    # head_dim is symbolic under torch.compile(dynamic=True) and assume_constant_result takes only
    # constants: operator.index specialises it (dynamo guards on its value, so another head_dim
    # recompiles and re-selects), where int() would keep it symbolic
    head_dim = None if call.head_dim is None else operator.index(call.head_dim)
    name = _select_name(call.op, call.device.type, call.dtype, head_dim, bool(call.gqa), bool(call.causal), backend)
    return name, _REGISTRY[name]._ops[call.op]


# torch.compile runs the selection once while tracing and keeps its answer (a constant), so the
# graph holds only the chosen kernel; changing NIT_KERNELS_BACKEND later does not re-trace.
@torch.compiler.assume_constant_result
def _select_name(op: str, device_type: str, dtype: torch.dtype, head_dim: Optional[int], gqa: bool,
                 causal: bool, backend: Optional[str]) -> str:
    call = Call(op, torch.device(device_type), dtype, head_dim, gqa, causal)
    requested, source = backend, "backend="
    if requested is None:
        env = os.environ.get(ENV_VAR, "").strip()
        if env and env != "auto" and get(env).implements(op):
            requested, source = env, f"{ENV_VAR}="
        elif env and env != "auto":
            get(env)  # unknown names fail loudly; known ones lacking this op fall through to auto
    if requested is not None:
        b = get(requested)
        why = b.refuse(call)
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
    env = os.environ.get(ENV_VAR)
    lines.append(f"{ENV_VAR}={env!r}" if env else f"{ENV_VAR} unset: automatic selection")
    return "\n".join(lines)
