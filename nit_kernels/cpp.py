"""Python side of the C++/CUDA extension: fake (meta) kernels, autograd, and the kernel interface.

The schemas live in csrc/registration.cpp; each backend registers kernels for the dispatch key
CPU or CUDA. Here every ``nit::*_fwd`` op gets ``register_fake`` (so torch.compile can trace it)
and ``register_autograd`` (its backward is the matching ``nit::*_bwd`` op of the same backend).
The functions at the bottom are the kernel interface of backends.py; a backend serves an op when
its dispatch key has a kernel for it (``ops_with_kernel``).
"""
from __future__ import annotations

from typing import Optional

import torch

from .backends import FLOAT_DTYPES, Call

_C = None
_IMPORT_ERROR: Optional[str] = None
try:
    from . import _C  # noqa: F401  (loading the library registers the nit:: ops)
except ImportError as e:
    _IMPORT_ERROR = (f"the C++ extension nit_kernels._C is not built ({e}); "
                     "build it with `pip install --no-build-isolation -e .`")

# public op -> the extension op whose kernel decides whether a backend implements it
_KERNEL_OF = {
    "adaln_modulate": "adaln_modulate_fwd",
    "gated_residual": "gated_residual_fwd",
    "residual_adaln": "residual_adaln_fwd",
    "rope_2d": "rope_2d",
    "qk_norm_rope": "qk_norm_rope_fwd",
    "varlen_attention": "varlen_attention_fwd",
}


def load_error() -> Optional[str]:
    return _IMPORT_ERROR


def has_kernel(name: str, dispatch_key: str) -> bool:
    return _C is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"nit::{name}", dispatch_key)


def device_error(dispatch_key: str) -> Optional[str]:
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    if dispatch_key == "CUDA":
        if not any(has_kernel(k, "CUDA") for k in _KERNEL_OF.values()):
            return "nit_kernels._C was built without CUDA kernels (CPU-only torch or NIT_BUILD_CUDA=0)"
        if not torch.cuda.is_available():
            return "no CUDA device is available"
    return None


def ops_with_kernel(dispatch_key: str) -> dict:
    return {op: fn for op, fn in OPS.items() if has_kernel(_KERNEL_OF[op], dispatch_key)}


def refuse(call: Call) -> Optional[str]:
    """Why the compiled kernel of `call.op` cannot run this call (None if it can)."""
    if call.dtype not in FLOAT_DTYPES:
        return f"dtype {call.dtype} is not supported (float32, float16, bfloat16)"
    return _refuse_cuda(call) if call.device.type == "cuda" else _refuse_cpu(call)


def _refuse_cpu(call: Call) -> Optional[str]:
    # varlen_attention: every head_dim, causal or not, and grouped-query heads are served
    return None


def _refuse_cuda(call: Call) -> Optional[str]:
    # limits of the CUDA kernels (csrc/cuda/launchers.h); grouped-query attention is supported
    limit = {"varlen_attention": 128, "qk_norm_rope": 256}.get(call.op)
    if limit is not None and call.head_dim is not None and call.head_dim > limit:
        return f"the CUDA {call.op} kernel supports head_dim <= {limit}, got {call.head_dim}"
    return None


def _c(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.contiguous()


def _or_zeros(g: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if g is None else g.contiguous()


def _f32(t: torch.Tensor, *shape) -> torch.Tensor:
    return t.new_empty(shape, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# fake kernels and autograd (only where the library is loaded)
# ---------------------------------------------------------------------------------------------
if _C is not None:
    lib = torch.library

    @lib.register_fake("nit::adaln_modulate_fwd")
    def _(x, shift, scale, cu_seqlens, eps):
        return torch.empty_like(x), _f32(x, x.shape[0]), _f32(x, x.shape[0])

    @lib.register_fake("nit::adaln_modulate_bwd")
    def _(dy, x, scale, mean, rstd, cu_seqlens):
        return torch.empty_like(x), torch.empty_like(scale), torch.empty_like(scale)

    def _adaln_setup(ctx, inputs, output):
        x, shift, scale, cu, eps = inputs
        ctx.save_for_backward(x, scale, output[1], output[2], cu)

    def _adaln_backward(ctx, dy, _dmean, _drstd):
        x, scale, mean, rstd, cu = ctx.saved_tensors
        dx, dshift, dscale = torch.ops.nit.adaln_modulate_bwd(_or_zeros(dy, x), x, scale, mean, rstd, cu)
        return dx, dshift, dscale, None, None

    lib.register_autograd("nit::adaln_modulate_fwd", _adaln_backward, setup_context=_adaln_setup)

    @lib.register_fake("nit::gated_residual_fwd")
    def _(x, y, gate, cu_seqlens):
        return torch.empty_like(x)

    @lib.register_fake("nit::gated_residual_bwd")
    def _(dout, y, gate, cu_seqlens):
        return torch.empty_like(y), torch.empty_like(gate)

    def _gated_setup(ctx, inputs, output):
        x, y, gate, cu = inputs
        ctx.save_for_backward(y, gate, cu)

    def _gated_backward(ctx, dout):
        y, gate, cu = ctx.saved_tensors
        dout = _or_zeros(dout, y)
        dy, dgate = torch.ops.nit.gated_residual_bwd(dout, y, gate, cu)
        return dout, dy, dgate, None

    lib.register_autograd("nit::gated_residual_fwd", _gated_backward, setup_context=_gated_setup)

    @lib.register_fake("nit::residual_adaln_fwd")
    def _(x, y, gate, shift, scale, cu_seqlens, eps):
        return torch.empty_like(x), torch.empty_like(x), _f32(x, x.shape[0]), _f32(x, x.shape[0])

    @lib.register_fake("nit::residual_adaln_bwd")
    def _(dx_new, dh, x_new, y, gate, scale, mean, rstd, cu_seqlens):
        return (torch.empty_like(x_new), torch.empty_like(y), torch.empty_like(gate),
                torch.empty_like(scale), torch.empty_like(scale))

    def _res_setup(ctx, inputs, output):
        x, y, gate, shift, scale, cu, eps = inputs
        ctx.save_for_backward(output[0], y, gate, scale, output[2], output[3], cu)

    def _res_backward(ctx, dx_new, dh, _dmean, _drstd):
        x_new, y, gate, scale, mean, rstd, cu = ctx.saved_tensors
        dx, dy, dgate, dshift, dscale = torch.ops.nit.residual_adaln_bwd(
            _or_zeros(dx_new, x_new), _or_zeros(dh, x_new), x_new, y, gate, scale, mean, rstd, cu)
        return dx, dy, dgate, dshift, dscale, None, None

    lib.register_autograd("nit::residual_adaln_fwd", _res_backward, setup_context=_res_setup)

    @lib.register_fake("nit::rope_2d")
    def _(q, k, cu_seqlens, sizes, freqs, positions, mscale, inverse):
        return torch.empty_like(q), torch.empty_like(k)

    def _rope_setup(ctx, inputs, output):
        q, k, cu, sizes, freqs, positions, mscale, inverse = inputs
        ctx.save_for_backward(cu, sizes, freqs)
        ctx.args = (positions, mscale, inverse)

    def _rope_backward(ctx, dq, dk):
        cu, sizes, freqs = ctx.saved_tensors
        positions, mscale, inverse = ctx.args
        # the transpose of a rotation (times mscale) is the inverse rotation (times mscale)
        gq, gk = torch.ops.nit.rope_2d(_c(dq), _c(dk), cu, sizes, freqs, positions, mscale, not inverse)
        return gq, gk, None, None, None, None, None, None

    lib.register_autograd("nit::rope_2d", _rope_backward, setup_context=_rope_setup)

    @lib.register_fake("nit::qk_norm_rope_fwd")
    def _(q, k, cu_seqlens, sizes, freqs, q_weight, q_bias, k_weight, k_bias, eps, positions, mscale):
        n = q.shape[0]
        return (torch.empty_like(q), torch.empty_like(k), _f32(q, n, q.shape[1]), _f32(q, n, q.shape[1]),
                _f32(k, n, k.shape[1]), _f32(k, n, k.shape[1]))

    @lib.register_fake("nit::qk_norm_rope_bwd")
    def _(dq_rot, dk_rot, q, k, cu_seqlens, sizes, freqs, q_weight, k_weight, q_mean, q_rstd, k_mean, k_rstd,
          positions, mscale):
        return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(q_weight), torch.empty_like(q_weight),
                torch.empty_like(k_weight), torch.empty_like(k_weight))

    def _qkn_setup(ctx, inputs, output):
        q, k, cu, sizes, freqs, qw, qb, kw, kb, eps, positions, mscale = inputs
        ctx.save_for_backward(q, k, cu, sizes, freqs, qw, kw, *output[2:])
        ctx.args = (positions, mscale)

    def _qkn_backward(ctx, dq, dk, *_stats):
        q, k, cu, sizes, freqs, qw, kw, qm, qr, km, kr = ctx.saved_tensors
        dq, dk, dqw, dqb, dkw, dkb = torch.ops.nit.qk_norm_rope_bwd(
            _or_zeros(dq, q), _or_zeros(dk, k), q, k, cu, sizes, freqs, qw, kw, qm, qr, km, kr, *ctx.args)
        return dq, dk, None, None, None, dqw, dqb, dkw, dkb, None, None, None

    lib.register_autograd("nit::qk_norm_rope_fwd", _qkn_backward, setup_context=_qkn_setup)

    @lib.register_fake("nit::varlen_attention_fwd")
    def _(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale, causal):
        return q.new_empty(q.shape[0], q.shape[1], v.shape[-1]), _f32(q, q.shape[1], q.shape[0])

    @lib.register_fake("nit::varlen_attention_bwd")
    def _(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, softmax_scale, causal):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    def _attn_setup(ctx, inputs, output):
        q, k, v, cu_q, cu_k, max_q, max_k, scale, causal = inputs
        ctx.save_for_backward(q, k, v, output[0], output[1], cu_q, cu_k)
        ctx.args = (max_q, max_k, scale, causal)

    def _attn_backward(ctx, dout, _dlse):
        q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
        dq, dk, dv = torch.ops.nit.varlen_attention_bwd(_or_zeros(dout, out), q, k, v, out, lse, cu_q, cu_k,
                                                        *ctx.args)
        return dq, dk, dv, None, None, None, None, None, None

    lib.register_autograd("nit::varlen_attention_fwd", _attn_backward, setup_context=_attn_setup)

    # The *_bwd kernels compute first derivatives only. Without an autograd formula PyTorch
    # would differentiate through them as constants (zeros and a warning) in a double backward.
    def _no_second_derivative(op: str, bwd: str):
        def backward(ctx, *grads):
            raise RuntimeError(
                f"{op}: the {ctx.backend} backend computes first derivatives only; a second derivative "
                f"(double backward, e.g. torch.autograd.grad(..., create_graph=True) then backward) "
                f"needs backend=\"reference\"")

        def setup(ctx, inputs, output):
            ctx.backend = "cuda" if inputs[0].is_cuda else "cpu"

        lib.register_autograd(f"nit::{bwd}", backward, setup_context=setup)

    for _op, _bwd in (("adaln_modulate", "adaln_modulate_bwd"), ("gated_residual", "gated_residual_bwd"),
                      ("residual_adaln", "residual_adaln_bwd"), ("qk_norm_rope", "qk_norm_rope_bwd"),
                      ("varlen_attention", "varlen_attention_bwd")):
        _no_second_derivative(_op, _bwd)


# ---------------------------------------------------------------------------------------------
# kernel interface (see backends.py); inputs are made contiguous here, the C++ side checks it
# ---------------------------------------------------------------------------------------------
def adaln_modulate(x, shift, scale, cu_seqlens, eps):
    return torch.ops.nit.adaln_modulate_fwd(_c(x), _c(shift), _c(scale), cu_seqlens, eps)[0]


def gated_residual(x, y, gate, cu_seqlens):
    return torch.ops.nit.gated_residual_fwd(_c(x), _c(y), _c(gate), cu_seqlens)


def residual_adaln(x, y, gate, shift, scale, cu_seqlens, eps):
    x_new, h, _, _ = torch.ops.nit.residual_adaln_fwd(_c(x), _c(y), _c(gate), _c(shift), _c(scale), cu_seqlens, eps)
    return x_new, h


def rope_2d(q, k, cu_seqlens, sizes, freqs, positions, mscale):
    return torch.ops.nit.rope_2d(_c(q), _c(k), cu_seqlens, sizes, _c(freqs.float()), positions, mscale, False)


def qk_norm_rope(q, k, cu_seqlens, sizes, freqs, q_weight, q_bias, k_weight, k_bias, eps, positions, mscale):
    out = torch.ops.nit.qk_norm_rope_fwd(_c(q), _c(k), cu_seqlens, sizes, _c(freqs.float()), _c(q_weight), _c(q_bias),
                                         _c(k_weight), _c(k_bias), eps, positions, mscale)
    return out[0], out[1]


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal):
    return torch.ops.nit.varlen_attention_fwd(_c(q), _c(k), _c(v), cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                              max_seqlen_k, softmax_scale, causal)[0]


OPS = {
    "adaln_modulate": adaln_modulate,
    "gated_residual": gated_residual,
    "residual_adaln": residual_adaln,
    "rope_2d": rope_2d,
    "qk_norm_rope": qk_norm_rope,
    "varlen_attention": varlen_attention,
}
