"""One contract per op: its argument lists, saved statistics, fake kernel and autograd, written once.

Every backend implements an op as raw functions with the same signature in every backend (the
schemas of csrc/registration.cpp, the canonical layout):

    <op>_fwd(inputs...)                            -> (outputs..., saved statistics...)
    <op>_bwd(output grads, saved tensors..., args) -> grads of the differentiable inputs

registered as ops of the backend's own torch.library namespace (``nit`` for the C++ kernels of
cpu and cuda, ``nit_sim`` for cuda_sim, ``nit_triton``, ``nit_ref``). ``register(ns)`` gives
every fwd op of a namespace its checking fake kernel and its autograd (``setup_context`` saves
what the contract says, ``backward`` calls the bwd op of the same namespace), and every bwd op a
fake and an autograd that refuses a second derivative naming the op (unless the backend brings
its own). ``define(ns, name, fn)`` turns a Python raw function into such an op, with the
contract's schema. ``rope_2d`` is its own backward: the transpose of a rotation is rope_2d with
``inverse=True``.

Saved statistics, fp32: LayerNorm ``mean``/``rstd`` [N] (adaln_modulate, residual_adaln) or
[N, heads] (qk_norm_rope, one pair for q and one for k); attention ``lse`` [H, Nq], the natural
log of each query's softmax normaliser.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch

__all__ = ["Contract", "CONTRACTS", "contract", "add_contract", "define", "register", "kernel_interface",
           "register_fake_and_autograd", "CORE_OPS"]

Tensor = torch.Tensor


# ---------------------------------------------------------------------------------------------
# checks of the fake kernels (shapes, dtypes, devices; symbolic sizes become guards)
# ---------------------------------------------------------------------------------------------
def check(op: str, cond, msg: Callable[[], str]) -> None:
    torch._check(cond, lambda: f"{op}: {msg()}")


def check_tensor(op: str, t: Tensor, name: str, shape: tuple, dtype=None, device=None) -> None:
    """`t` has `shape` (ints or symbolic sizes; None matches any size), `dtype` and `device`."""
    check(op, t.dim() == len(shape), lambda: f"{name} must have {len(shape)} dims, got shape {tuple(t.shape)}")
    for i, s in enumerate(shape):
        if s is not None:
            check(op, t.shape[i] == s, lambda: f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if dtype is not None:
        check(op, t.dtype == dtype, lambda: f"{name} must be {dtype}, got {t.dtype}")
    if device is not None:
        check(op, t.device == device, lambda: f"{name} is on {t.device}, expected {device}")


def _cu(op: str, cu: Tensor, ref: Tensor, name: str = "cu_seqlens"):
    """The number of packed sequences B of an int32 [B+1] cu_seqlens on `ref`'s device."""
    check_tensor(op, cu, name, (None,), torch.int32, ref.device)
    return cu.shape[0] - 1


def _f32(t: Tensor, *shape) -> Tensor:
    return t.new_empty(shape, dtype=torch.float32)


def _zeros(g: Optional[Tensor], like: Tensor) -> Tensor:
    """An output gradient autograd left out (None) is zero; the kernels take contiguous ones."""
    return torch.zeros_like(like) if g is None else g.contiguous()


# ---------------------------------------------------------------------------------------------
# the contracts
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Contract:
    """What every backend of op `name` agrees on.

    fwd/bwd: names of the raw ops in a backend's namespace (bwd is fwd itself for rope_2d);
    fwd_schema/bwd_schema: their argument lists and results (those of csrc/registration.cpp);
    outputs: how many leading results of fwd the public function returns (the rest are saved);
    fake_fwd/fake_bwd: checking fake kernels; setup(ctx, inputs, output) saves what the backward
    needs; backward(bwd_op, ctx, *grads) returns one gradient (or None) per fwd input.
    """

    name: str
    fwd: str
    bwd: str
    fwd_schema: str
    bwd_schema: Optional[str]
    outputs: int
    fake_fwd: Callable
    fake_bwd: Optional[Callable]
    setup: Callable
    backward: Callable


CONTRACTS: dict[str, Contract] = {}


def add_contract(c: Contract) -> Contract:
    """Register the contract of a new op (its name must be new); returns it."""
    if c.name in CONTRACTS:
        raise ValueError(f"op {c.name!r} already has a contract")
    CONTRACTS[c.name] = c
    return c


def contract(op: str) -> Contract:
    if op not in CONTRACTS:
        raise ValueError(f"no contract for op {op!r}; known: {', '.join(CONTRACTS)}")
    return CONTRACTS[op]


def _rows(op: str, x: Tensor, cu: Tensor, **rows: Tensor):
    """x [N, D] and per-image rows [B, D] of x's dtype and device; returns (N, D)."""
    check_tensor(op, x, "x", (None, None))
    b = _cu(op, cu, x)
    for name, t in rows.items():
        check_tensor(op, t, name, (b, x.shape[1]), x.dtype, x.device)
    return x.shape[0], x.shape[1]


def _stats(op: str, x: Tensor, shape: tuple, **stats: Tensor):
    for name, t in stats.items():
        check_tensor(op, t, name, shape, torch.float32, x.device)


# adaln_modulate ------------------------------------------------------------------------------
def _adaln_fake(x, shift, scale, cu_seqlens, eps):
    n, _ = _rows("adaln_modulate_fwd", x, cu_seqlens, shift=shift, scale=scale)
    return torch.empty_like(x), _f32(x, n), _f32(x, n)


def _adaln_bwd_fake(dy, x, scale, mean, rstd, cu_seqlens):
    op = "adaln_modulate_bwd"
    n, d = _rows(op, x, cu_seqlens, scale=scale)
    check_tensor(op, dy, "dy", (n, d), x.dtype, x.device)
    _stats(op, x, (n,), mean=mean, rstd=rstd)
    return torch.empty_like(x), torch.empty_like(scale), torch.empty_like(scale)


def _adaln_setup(ctx, inputs, output):
    x, shift, scale, cu, eps = inputs
    ctx.save_for_backward(x, scale, output[1], output[2], cu)


def _adaln_backward(bwd, ctx, dy, _dmean, _drstd):
    x, scale, mean, rstd, cu = ctx.saved_tensors
    dx, dshift, dscale = bwd(_zeros(dy, x), x, scale, mean, rstd, cu)
    return dx, dshift, dscale, None, None


# gated_residual ------------------------------------------------------------------------------
def _gated_fake(x, y, gate, cu_seqlens):
    n, d = _rows("gated_residual_fwd", x, cu_seqlens, gate=gate)
    check_tensor("gated_residual_fwd", y, "y", (n, d), x.dtype, x.device)
    return torch.empty_like(x)


def _gated_bwd_fake(dout, y, gate, cu_seqlens):
    n, d = _rows("gated_residual_bwd", y, cu_seqlens, gate=gate)
    check_tensor("gated_residual_bwd", dout, "dout", (n, d), y.dtype, y.device)
    return torch.empty_like(y), torch.empty_like(gate)


def _gated_setup(ctx, inputs, output):
    x, y, gate, cu = inputs
    ctx.save_for_backward(y, gate, cu)


def _gated_backward(bwd, ctx, dout):
    y, gate, cu = ctx.saved_tensors
    dout = _zeros(dout, y)
    dy, dgate = bwd(dout, y, gate, cu)
    return dout, dy, dgate, None


# residual_adaln ------------------------------------------------------------------------------
def _residual_fake(x, y, gate, shift, scale, cu_seqlens, eps):
    n, d = _rows("residual_adaln_fwd", x, cu_seqlens, gate=gate, shift=shift, scale=scale)
    check_tensor("residual_adaln_fwd", y, "y", (n, d), x.dtype, x.device)
    return torch.empty_like(x), torch.empty_like(x), _f32(x, n), _f32(x, n)


def _residual_bwd_fake(dx_new, dh, x, y, gate, scale, mean, rstd, cu_seqlens):
    op = "residual_adaln_bwd"
    n, d = _rows(op, x, cu_seqlens, gate=gate, scale=scale)
    for name, t in (("dx_new", dx_new), ("dh", dh), ("y", y)):
        check_tensor(op, t, name, (n, d), x.dtype, x.device)
    _stats(op, x, (n,), mean=mean, rstd=rstd)
    return (torch.empty_like(x), torch.empty_like(y), torch.empty_like(gate),
            torch.empty_like(scale), torch.empty_like(scale))


def _residual_setup(ctx, inputs, output):
    # x, not the rounded x_new: the backward re-forms x_new = x + gate*y in fp32, since the
    # rounding error of x_new dwarfs a row's deviations when the row mean is large
    x, y, gate, shift, scale, cu, eps = inputs
    ctx.save_for_backward(x, y, gate, scale, output[2], output[3], cu)


def _residual_backward(bwd, ctx, dx_new, dh, _dmean, _drstd):
    x, y, gate, scale, mean, rstd, cu = ctx.saved_tensors
    dx, dy, dgate, dshift, dscale = bwd(_zeros(dx_new, x), _zeros(dh, x), x, y, gate, scale, mean, rstd, cu)
    return dx, dy, dgate, dshift, dscale, None, None


# rope_2d and qk_norm_rope --------------------------------------------------------------------
def _qk(op: str, q, k, cu_seqlens, sizes, freqs):
    """q [N, H, Dh], k [N, Hk, Dh] of one dtype; sizes int32 [B, 2]; freqs fp32 [2, Dh/4]."""
    check_tensor(op, q, "q", (None, None, None))
    n, dh = q.shape[0], q.shape[2]
    check_tensor(op, k, "k", (n, None, dh), q.dtype, q.device)
    b = _cu(op, cu_seqlens, q)
    check_tensor(op, sizes, "sizes", (b, 2), torch.int32, q.device)
    check_tensor(op, freqs, "freqs", (2, dh // 4), torch.float32, q.device)
    return n, dh


def _rope_fake(q, k, cu_seqlens, sizes, freqs, positions, mscale, inverse):
    _qk("rope_2d", q, k, cu_seqlens, sizes, freqs)
    return torch.empty_like(q), torch.empty_like(k)


def _rope_setup(ctx, inputs, output):
    q, k, cu, sizes, freqs, positions, mscale, inverse = inputs
    ctx.save_for_backward(cu, sizes, freqs)
    ctx.args = (positions, mscale, inverse)
    ctx.like = [(t.shape, t.dtype, t.device) for t in (q, k)]


def _rope_backward(rope, ctx, dq, dk):
    cu, sizes, freqs = ctx.saved_tensors
    positions, mscale, inverse = ctx.args
    dq, dk = (torch.zeros(s, dtype=dt, device=dev) if g is None else g.contiguous()
              for g, (s, dt, dev) in zip((dq, dk), ctx.like))
    # the transpose of a rotation (times mscale) is the inverse rotation (times mscale)
    gq, gk = rope(dq, dk, cu, sizes, freqs, positions, mscale, not inverse)
    return gq, gk, None, None, None, None, None, None


def _qkn_fake(q, k, cu_seqlens, sizes, freqs, q_weight, q_bias, k_weight, k_bias, eps, positions, mscale):
    op = "qk_norm_rope_fwd"
    n, dh = _qk(op, q, k, cu_seqlens, sizes, freqs)
    for name, t in (("q_weight", q_weight), ("q_bias", q_bias), ("k_weight", k_weight), ("k_bias", k_bias)):
        check_tensor(op, t, name, (dh,), q_weight.dtype, q.device)
    h, hk = q.shape[1], k.shape[1]
    return (torch.empty_like(q), torch.empty_like(k), _f32(q, n, h), _f32(q, n, h), _f32(k, n, hk), _f32(k, n, hk))


def _qkn_bwd_fake(dq_rot, dk_rot, q, k, cu_seqlens, sizes, freqs, q_weight, k_weight, q_mean, q_rstd, k_mean,
                  k_rstd, positions, mscale):
    op = "qk_norm_rope_bwd"
    n, dh = _qk(op, q, k, cu_seqlens, sizes, freqs)
    check_tensor(op, dq_rot, "dq_rot", tuple(q.shape), q.dtype, q.device)
    check_tensor(op, dk_rot, "dk_rot", tuple(k.shape), k.dtype, k.device)
    for name, t in (("q_weight", q_weight), ("k_weight", k_weight)):
        check_tensor(op, t, name, (dh,), q_weight.dtype, q.device)
    _stats(op, q, (n, q.shape[1]), q_mean=q_mean, q_rstd=q_rstd)
    _stats(op, q, (n, k.shape[1]), k_mean=k_mean, k_rstd=k_rstd)
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(q_weight), torch.empty_like(q_weight),
            torch.empty_like(k_weight), torch.empty_like(k_weight))


def _qkn_setup(ctx, inputs, output):
    q, k, cu, sizes, freqs, qw, qb, kw, kb, eps, positions, mscale = inputs
    ctx.save_for_backward(q, k, cu, sizes, freqs, qw, kw, *output[2:])
    ctx.args = (positions, mscale)


def _qkn_backward(bwd, ctx, dq, dk, *_stats):
    q, k, cu, sizes, freqs, qw, kw, qm, qr, km, kr = ctx.saved_tensors
    dq, dk, dqw, dqb, dkw, dkb = bwd(_zeros(dq, q), _zeros(dk, k), q, k, cu, sizes, freqs, qw, kw, qm, qr, km, kr,
                                     *ctx.args)
    return dq, dk, None, None, None, dqw, dqb, dkw, dkb, None, None, None


# varlen_attention ----------------------------------------------------------------------------
def _attn_qkv(op: str, q, k, v, cu_q, cu_k):
    check_tensor(op, q, "q", (None, None, None))
    check_tensor(op, k, "k", (None, None, q.shape[2]), q.dtype, q.device)
    check_tensor(op, v, "v", (k.shape[0], k.shape[1], None), q.dtype, q.device)
    b = _cu(op, cu_q, q, "cu_seqlens_q")
    check_tensor(op, cu_k, "cu_seqlens_k", (b + 1,), torch.int32, q.device)


def _attn_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal):
    _attn_qkv("varlen_attention_fwd", q, k, v, cu_seqlens_q, cu_seqlens_k)
    return q.new_empty(q.shape[0], q.shape[1], v.shape[-1]), _f32(q, q.shape[1], q.shape[0])


def _attn_bwd_fake(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                   softmax_scale, causal):
    op = "varlen_attention_bwd"
    _attn_qkv(op, q, k, v, cu_seqlens_q, cu_seqlens_k)
    out_shape = (q.shape[0], q.shape[1], v.shape[2])
    check_tensor(op, out, "out", out_shape, q.dtype, q.device)
    check_tensor(op, dout, "dout", out_shape, q.dtype, q.device)
    check_tensor(op, lse, "lse", (q.shape[1], q.shape[0]), torch.float32, q.device)
    # contiguous like the kernels' outputs, whatever the strides of q, k, v
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attn_setup(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, scale, causal = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], cu_q, cu_k)
    ctx.args = (max_q, max_k, scale, causal)


def _attn_backward(bwd, ctx, dout, _dlse):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    dq, dk, dv = bwd(_zeros(dout, out), q, k, v, out, lse, cu_q, cu_k, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None


for _c in (
    Contract("adaln_modulate", "adaln_modulate_fwd", "adaln_modulate_bwd",
             "(Tensor x, Tensor shift, Tensor scale, Tensor cu_seqlens, float eps) "
             "-> (Tensor y, Tensor mean, Tensor rstd)",
             "(Tensor dy, Tensor x, Tensor scale, Tensor mean, Tensor rstd, Tensor cu_seqlens) "
             "-> (Tensor dx, Tensor dshift, Tensor dscale)",
             1, _adaln_fake, _adaln_bwd_fake, _adaln_setup, _adaln_backward),
    Contract("gated_residual", "gated_residual_fwd", "gated_residual_bwd",
             "(Tensor x, Tensor y, Tensor gate, Tensor cu_seqlens) -> Tensor",
             "(Tensor dout, Tensor y, Tensor gate, Tensor cu_seqlens) -> (Tensor dy, Tensor dgate)",
             1, _gated_fake, _gated_bwd_fake, _gated_setup, _gated_backward),
    Contract("residual_adaln", "residual_adaln_fwd", "residual_adaln_bwd",
             "(Tensor x, Tensor y, Tensor gate, Tensor shift, Tensor scale, Tensor cu_seqlens, float eps) "
             "-> (Tensor x_new, Tensor h, Tensor mean, Tensor rstd)",
             "(Tensor dx_new, Tensor dh, Tensor x, Tensor y, Tensor gate, Tensor scale, Tensor mean, Tensor rstd, "
             "Tensor cu_seqlens) -> (Tensor dx, Tensor dy, Tensor dgate, Tensor dshift, Tensor dscale)",
             2, _residual_fake, _residual_bwd_fake, _residual_setup, _residual_backward),
    Contract("rope_2d", "rope_2d", "rope_2d",
             "(Tensor q, Tensor k, Tensor cu_seqlens, Tensor sizes, Tensor freqs, str positions, float mscale, "
             "bool inverse) -> (Tensor q_rot, Tensor k_rot)",
             None, 2, _rope_fake, None, _rope_setup, _rope_backward),
    Contract("qk_norm_rope", "qk_norm_rope_fwd", "qk_norm_rope_bwd",
             "(Tensor q, Tensor k, Tensor cu_seqlens, Tensor sizes, Tensor freqs, Tensor q_weight, Tensor q_bias, "
             "Tensor k_weight, Tensor k_bias, float eps, str positions, float mscale) -> (Tensor q_rot, "
             "Tensor k_rot, Tensor q_mean, Tensor q_rstd, Tensor k_mean, Tensor k_rstd)",
             "(Tensor dq_rot, Tensor dk_rot, Tensor q, Tensor k, Tensor cu_seqlens, Tensor sizes, Tensor freqs, "
             "Tensor q_weight, Tensor k_weight, Tensor q_mean, Tensor q_rstd, Tensor k_mean, Tensor k_rstd, "
             "str positions, float mscale) -> (Tensor dq, Tensor dk, Tensor dq_weight, Tensor dq_bias, "
             "Tensor dk_weight, Tensor dk_bias)",
             2, _qkn_fake, _qkn_bwd_fake, _qkn_setup, _qkn_backward),
    Contract("varlen_attention", "varlen_attention_fwd", "varlen_attention_bwd",
             "(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, SymInt max_seqlen_q, "
             "SymInt max_seqlen_k, float softmax_scale, bool causal) -> (Tensor out, Tensor lse)",
             "(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor cu_seqlens_q, "
             "Tensor cu_seqlens_k, SymInt max_seqlen_q, SymInt max_seqlen_k, float softmax_scale, bool causal) "
             "-> (Tensor dq, Tensor dk, Tensor dv)",
             1, _attn_fake, _attn_bwd_fake, _attn_setup, _attn_backward),
):
    add_contract(_c)

# the ops of the package (csrc/registration.cpp has their schemas); add_contract may add more
CORE_OPS = tuple(CONTRACTS)


# bias_gelu -----------------------------------------------------------------------------------
# Not a packed op (no cu_seqlens) and not one of CORE_OPS: only the reference and the cpu
# backend implement it (csrc/cpu/bias_gelu.cpp); dispatch sends every other call to the reference.
def _bias_gelu_args(op: str, x, bias):
    check_tensor(op, x, "x", (None, None))
    check(op, x.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64),
          lambda: f"x must be a floating-point tensor, got {x.dtype}")
    check_tensor(op, bias, "bias", (x.shape[1],), None, x.device)
    check(op, bias.is_floating_point(), lambda: f"bias must be a floating-point tensor, got {bias.dtype}")


def _bias_gelu_fake(x, bias):
    _bias_gelu_args("bias_gelu_fwd", x, bias)
    return torch.empty_like(x)


def _bias_gelu_bwd_fake(dy, x, bias):
    _bias_gelu_args("bias_gelu_bwd", x, bias)
    check_tensor("bias_gelu_bwd", dy, "dy", tuple(x.shape), x.dtype, x.device)
    return torch.empty_like(x), torch.empty_like(bias), torch.empty_like(x)


def _bias_gelu_setup(ctx, inputs, output):
    x, bias = inputs
    ctx.save_for_backward(x, bias)


def _bias_gelu_backward(bwd, ctx, dy):
    x, bias = ctx.saved_tensors
    dx, dbias, _y = bwd(_zeros(dy, x), x, bias)
    return dx, dbias


add_contract(Contract(
    "bias_gelu", "bias_gelu_fwd", "bias_gelu_bwd",
    "(Tensor x, Tensor bias) -> Tensor",
    "(Tensor dy, Tensor x, Tensor bias) -> (Tensor dx, Tensor dbias, Tensor y)",
    1, _bias_gelu_fake, _bias_gelu_bwd_fake, _bias_gelu_setup, _bias_gelu_backward))

# the ops of csrc/registration.cpp that are not CORE_OPS (served by the cpu backend only)
EXTRA_BUILT_OPS = ("bias_gelu",)


# ---------------------------------------------------------------------------------------------
# registration
# ---------------------------------------------------------------------------------------------
def define(ns: str, name: str, fn: Callable, *, triton: bool = False):
    """The Python raw function `fn` as the op ``ns::name`` with its contract's schema.

    `name` is a contract's fwd or bwd op name. ``triton=True`` makes a ``torch.library.triton_op``
    (torch.compile then sees the Triton kernels and needs no fake kernel)."""
    c = next((c for c in CONTRACTS.values() if name in (c.fwd, c.bwd)), None)
    if c is None:
        raise ValueError(f"{name!r} is the fwd or bwd op of no contract")
    schema = c.fwd_schema if name == c.fwd else c.bwd_schema
    if triton:
        return torch.library.triton_op(f"{ns}::{name}", fn, mutates_args=(), schema=schema)
    return torch.library.custom_op(f"{ns}::{name}", fn, mutates_args=(), schema=schema)


def register_fake_and_autograd(ns: str, op: str, backend: str | Callable[[Tensor], str], *, fakes: bool = True,
                               second_derivative: Optional[tuple[Callable, Callable]] = None) -> None:
    """Fake kernels and autograd of op `op` in library `ns`, from its contract.

    backend: the backend's name in error messages (or a function of the first input giving it);
    fakes=False leaves out the fake kernels (a triton_op traces its launcher instead);
    second_derivative: (backward, setup_context) of the bwd op, for a backend that has one; the
    default refuses a double backward with an error naming the op and the backend."""
    c = contract(op)
    ops = getattr(torch.ops, ns)
    bwd = getattr(ops, c.bwd)
    if fakes:
        torch.library.register_fake(f"{ns}::{c.fwd}", c.fake_fwd)
        if c.fake_bwd is not None:
            torch.library.register_fake(f"{ns}::{c.bwd}", c.fake_bwd)

    def backward(ctx, *grads):
        return c.backward(bwd, ctx, *grads)

    torch.library.register_autograd(f"{ns}::{c.fwd}", backward, setup_context=c.setup)
    if c.bwd == c.fwd:
        return
    if second_derivative is not None:
        torch.library.register_autograd(f"{ns}::{c.bwd}", second_derivative[0], setup_context=second_derivative[1])
        return

    # The bwd kernels compute first derivatives only. Without an autograd formula PyTorch would
    # differentiate through them as constants (zeros and a warning) in a double backward.
    def refuse(ctx, *grads):
        raise RuntimeError(
            f"{op}: the {ctx.backend} backend computes first derivatives only; a second derivative "
            f"(double backward, e.g. torch.autograd.grad(..., create_graph=True) then backward) "
            f"needs backend=\"reference\"")

    def setup(ctx, inputs, output):
        ctx.backend = backend(inputs[0]) if callable(backend) else backend

    torch.library.register_autograd(f"{ns}::{c.bwd}", refuse, setup_context=setup)


def register(ns: str, backend: str | Callable[[Tensor], str], ops=None, **kwargs) -> None:
    """register_fake_and_autograd for every op of `ops` (default: every contract) in library `ns`."""
    for op in (CONTRACTS if ops is None else ops):
        register_fake_and_autograd(ns, op, backend, **kwargs)


def _contiguous(op: str, t: Tensor) -> Tensor:
    return t.contiguous()


def kernel_interface(ns: str, ops=None, operand: Callable[[str, Tensor], Tensor] = _contiguous) -> dict:
    """Op name -> the function dispatch calls: the fwd op of library `ns` on the public op's
    arguments (each tensor passed through ``operand(op, t)``, contiguous by default), returning
    only the outputs (the saved statistics stay with autograd)."""
    lib = getattr(torch.ops, ns)

    def make(c: Contract):
        fwd = getattr(lib, c.fwd)
        extra = (False,) if c.fwd == c.bwd else ()  # rope_2d: inverse=False

        def run(*args):
            out = fwd(*(operand(c.name, a) if isinstance(a, Tensor) else a for a in args), *extra)
            if isinstance(out, Tensor):
                return out
            return out[0] if c.outputs == 1 else tuple(out[:c.outputs])

        run.__name__ = c.name
        return run

    return {op: make(contract(op)) for op in (CONTRACTS if ops is None else ops)}
