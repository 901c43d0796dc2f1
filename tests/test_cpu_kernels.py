"""The C++ CPU kernels (backend "cpu") of adaln_modulate, gated_residual, residual_adaln, rope_2d
and qk_norm_rope: operator registration (opcheck), torch.compile, thread-count determinism,
non-contiguous inputs, awkward packs, fuzzing against the reference, and argument checking of
the raw torch.ops.nit.* operators.

The dtype x shape grid against the reference lives in tests/test_ops_conformance.py.
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import nit_kernels as nk
from nit_kernels import dispatch
from nit_kernels.testing import check_against_reference, random_sizes

_WHY = dispatch.get("cpu").load_error()
pytestmark = pytest.mark.skipif(_WHY is not None, reason=f"cpu backend unavailable: {_WHY}")

ops = torch.ops.nit
ADALN_OPS = ("adaln_modulate", "gated_residual", "residual_adaln")
ROPE_OPS = ("rope_2d", "qk_norm_rope")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _pack(sizes):
    return nk.PackedSeqs.from_sizes(list(sizes))


def _modulation_args(packed, dim, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    n, b = packed.total_tokens, packed.num_seqs
    x = torch.randn(n, dim, generator=g) * 1.5 + 0.7
    y = torch.randn(n, dim, generator=g)
    gate, shift, scale = (torch.randn(3, b, dim, generator=g) * 0.5).unbind(0)
    return [t.to(dtype) for t in (x, y, gate, shift, scale)]


def _rope_args(packed, heads, kv_heads, head_dim, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = packed.total_tokens
    q = (torch.randn(n, heads, head_dim, generator=g) + 0.3).to(dtype)
    k = (torch.randn(n, kv_heads, head_dim, generator=g) - 0.2).to(dtype)
    w = [1 + 0.2 * torch.randn(head_dim, generator=g) for _ in range(2)]
    b = [0.2 * torch.randn(head_dim, generator=g) for _ in range(2)]
    return q, k, nk.rope_freqs(head_dim), w, b


# ---------------------------------------------------------------------------------------------
# torch.library.opcheck of every forward and backward operator
# ---------------------------------------------------------------------------------------------
SMALL = _pack([(1, 1), (2, 3), (3, 1), (1, 4)])  # 14 tokens


def _opcheck_cases():
    p, cu = SMALL, SMALL.cu_seqlens
    n, d = p.total_tokens, 13  # D not a multiple of the vector width
    x, y, gate, shift, scale = _modulation_args(p, d)
    mean, rstd = torch.randn(n).abs(), torch.rand(n) + 0.5
    dy = torch.randn(n, d)
    q, k, freqs, (qw, kw), (qb, kb) = _rope_args(p, 3, 1, 12)  # head_dim 12: a half-vector tail
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    qm, qr = torch.randn(n, 3), torch.rand(n, 3) + 0.5
    km, kr = torch.randn(n, 1), torch.rand(n, 1) + 0.5
    rg = lambda *ts: [t.clone().requires_grad_() for t in ts]  # noqa: E731
    return {
        "adaln_modulate_fwd": (ops.adaln_modulate_fwd, (*rg(x, shift, scale), cu, 1e-6)),
        "adaln_modulate_bwd": (ops.adaln_modulate_bwd, (dy, x, scale, mean, rstd, cu)),
        "gated_residual_fwd": (ops.gated_residual_fwd, (*rg(x, y, gate), cu)),
        "gated_residual_bwd": (ops.gated_residual_bwd, (dy, y, gate, cu)),
        "residual_adaln_fwd": (ops.residual_adaln_fwd, (*rg(x, y, gate, shift, scale), cu, 1e-6)),
        "residual_adaln_bwd": (ops.residual_adaln_bwd, (dy, dy * 0.5, x, y, gate, scale, mean, rstd, cu)),
        "rope_2d": (ops.rope_2d, (*rg(q, k), cu, p.sizes, freqs, "grid", 1.25, False)),
        "rope_2d_inverse": (ops.rope_2d, (*rg(q, k), cu, p.sizes, freqs, "official", 0.8, True)),
        "qk_norm_rope_fwd": (ops.qk_norm_rope_fwd,
                             (*rg(q, k), cu, p.sizes, freqs, *rg(qw, qb, kw, kb), 1e-5, "official", 1.1)),
        "qk_norm_rope_bwd": (ops.qk_norm_rope_bwd,
                             (dq, dk, q, k, cu, p.sizes, freqs, qw, kw, qm, qr, km, kr, "grid", 1.0)),
    }


@pytest.mark.parametrize("case", list(_opcheck_cases()))
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


# ---------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True) of a chain of the public functions
# ---------------------------------------------------------------------------------------------
def test_compile_fullgraph_matches_eager():
    packed = _pack([(1, 1), (3, 5), (4, 1), (2, 6)])
    x, y, gate, shift, scale = _modulation_args(packed, 40)
    q, k, freqs, (qw, kw), (qb, kb) = _rope_args(packed, 2, 1, 20)
    leaves = [t.requires_grad_() for t in (x, y, gate, shift, scale, q, k, qw, qb, kw, kb)]

    def chain(x, y, gate, shift, scale, q, k, qw, qb, kw, kb):
        x_new, h = nk.residual_adaln(x, y, gate, shift, scale, packed, backend="cpu")
        h = nk.adaln_modulate(h, shift, scale, packed, backend="cpu")
        out = nk.gated_residual(x_new, h, gate, packed, backend="cpu")
        q, k = nk.qk_norm_rope(q, k, packed, freqs, q_weight=qw, q_bias=qb, k_weight=kw, k_bias=kb,
                               positions="official", mscale=1.1, backend="cpu")
        q, k = nk.rope_2d(q, k, packed, freqs, backend="cpu")
        return out, q, k

    def run(fn):
        outs = fn(*leaves)
        gos = [torch.full_like(o, 0.5) + torch.arange(o.numel()).reshape(o.shape) % 7 * 0.1 for o in outs]
        return outs, torch.autograd.grad(outs, leaves, gos)

    torch._dynamo.reset()
    eager_out, eager_grads = run(chain)
    comp_out, comp_grads = run(torch.compile(chain, fullgraph=True))
    for a, e in zip(comp_out + comp_grads, eager_out + eager_grads):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# bitwise-identical results for any thread count
# ---------------------------------------------------------------------------------------------
def _all_ops_fwd_bwd(packed, dtype):
    """Outputs of every forward and backward operator on one set of inputs."""
    cu, sizes = packed.cu_seqlens, packed.sizes
    x, y, gate, shift, scale = _modulation_args(packed, 203, dtype)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(5)).to(dtype)
    res = list(ops.adaln_modulate_fwd(x, shift, scale, cu, 1e-6))
    res += ops.adaln_modulate_bwd(dy, x, scale, res[1], res[2], cu)
    res += [ops.gated_residual_fwd(x, y, gate, cu), *ops.gated_residual_bwd(dy, y, gate, cu)]
    fwd = ops.residual_adaln_fwd(x, y, gate, shift, scale, cu, 1e-6)
    res += list(fwd) + list(ops.residual_adaln_bwd(dy, dy * 0.5, fwd[0], y, gate, scale, fwd[2], fwd[3], cu))
    q, k, freqs, (qw, kw), (qb, kb) = _rope_args(packed, 3, 2, 68, dtype)
    res += ops.rope_2d(q, k, cu, sizes, freqs, "grid", 1.0, False)
    res += ops.rope_2d(q, k, cu, sizes, freqs, "official", 1.3, True)
    fwd = ops.qk_norm_rope_fwd(q, k, cu, sizes, freqs, qw, qb, kw, kb, 1e-5, "grid", 1.0)
    res += list(fwd) + list(ops.qk_norm_rope_bwd(q * 0.5, k * 2, q, k, cu, sizes, freqs, qw, kw, *fwd[2:],
                                                 "grid", 1.0))
    return res


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_thread_count_does_not_change_results(dtype):
    packed = _pack(random_sizes(40, max_side=11, seed=3) + [(1, 1), (1, 13), (9, 1)])
    before = torch.get_num_threads()
    try:
        results = {}
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results[threads] = _all_ops_fwd_bwd(packed, dtype)
    finally:
        torch.set_num_threads(before)
    for threads in (2, 3):
        for i, (a, b) in enumerate(zip(results[threads], results[1])):
            assert a.dtype == b.dtype and a.shape == b.shape
            assert torch.equal(a, b), f"output {i} differs between 1 and {threads} threads"


# ---------------------------------------------------------------------------------------------
# non-contiguous inputs: made contiguous by the public API, refused by the raw operators
# ---------------------------------------------------------------------------------------------
def test_public_api_accepts_non_contiguous_inputs():
    packed = _pack([(3, 4), (1, 5), (2, 1)])
    n, b, d = packed.total_tokens, packed.num_seqs, 24
    g = torch.Generator().manual_seed(1)
    # transposed views: same values as a contiguous tensor, different strides
    x_t, y_t = (torch.randn(d, n, generator=g).t() for _ in range(2))
    gate_t, shift_t, scale_t = (torch.randn(d, b, generator=g).t() * 0.5 for _ in range(3))
    q_t = torch.randn(n, 16, 2, generator=g).transpose(1, 2)
    k_t = torch.randn(16, n, 1, generator=g).permute(1, 2, 0)
    freqs = nk.rope_freqs(16)
    assert not any(t.is_contiguous() for t in (x_t, y_t, gate_t, shift_t, scale_t, q_t, k_t))
    non_contig = (x_t, y_t, gate_t, shift_t, scale_t, q_t, k_t)
    contig = tuple(t.contiguous() for t in non_contig)

    def all_ops(x, y, gate, shift, scale, q, k, backend):
        return (nk.adaln_modulate(x, shift, scale, packed, backend=backend),
                nk.gated_residual(x, y, gate, packed, backend=backend),
                *nk.residual_adaln(x, y, gate, shift, scale, packed, backend=backend),
                *nk.rope_2d(q, k, packed, freqs, backend=backend),
                *nk.qk_norm_rope(q, k, packed, freqs, q_weight=torch.ones(16), q_bias=torch.zeros(16),
                                 k_weight=torch.ones(16), k_bias=torch.zeros(16), backend=backend))

    got = all_ops(*non_contig, backend="cpu")
    same = all_ops(*contig, backend="cpu")
    want = all_ops(*contig, backend="reference")
    for a, s, w in zip(got, same, want):
        assert torch.equal(a, s)
        torch.testing.assert_close(a, w, rtol=1e-5, atol=1e-5)

    # gradients through the non-contiguous leaves
    leaves = [t.detach().clone().requires_grad_() for t in non_contig[:5]]  # clone keeps the strides
    assert not any(t.is_contiguous() for t in leaves)
    x_new, h = nk.residual_adaln(*leaves, packed, backend="cpu")
    grads = torch.autograd.grad((x_new.sum() + (h * h).sum()), leaves)
    ref_leaves = [t.detach().contiguous().requires_grad_() for t in leaves]
    x_new, h = nk.residual_adaln(*ref_leaves, packed, backend="reference")
    ref_grads = torch.autograd.grad((x_new.sum() + (h * h).sum()), ref_leaves)
    for a, w in zip(grads, ref_grads):
        torch.testing.assert_close(a, w, rtol=1e-4, atol=1e-4)


def test_raw_operators_refuse_non_contiguous_inputs():
    packed = _pack([(2, 2), (1, 3)])
    n, b, d = packed.total_tokens, packed.num_seqs, 8
    cu = packed.cu_seqlens
    x = torch.randn(d, n).t()
    shift, scale = torch.randn(b, d), torch.randn(b, d)
    with pytest.raises(RuntimeError, match=r"x must be contiguous \(got strides"):
        ops.adaln_modulate_fwd(x, shift, scale, cu, 1e-6)
    with pytest.raises(RuntimeError, match="scale must be contiguous"):
        ops.adaln_modulate_fwd(x.contiguous(), shift, torch.randn(d, b).t(), cu, 1e-6)
    with pytest.raises(RuntimeError, match="y must be contiguous"):
        ops.gated_residual_fwd(x.contiguous(), x, shift, cu)
    with pytest.raises(RuntimeError, match="dh must be contiguous"):
        ops.residual_adaln_bwd(x.contiguous(), x, x.contiguous(), x.contiguous(), shift, scale,
                               torch.zeros(n), torch.ones(n), cu)
    q = torch.randn(n, 8, 2).transpose(1, 2)
    k = torch.randn(n, 1, 8)
    freqs = nk.rope_freqs(8)
    with pytest.raises(RuntimeError, match="q must be contiguous"):
        ops.rope_2d(q, k, cu, packed.sizes, freqs, "grid", 1.0, False)
    with pytest.raises(RuntimeError, match="freqs must be contiguous"):
        ops.rope_2d(q.contiguous(), k, cu, packed.sizes, freqs.t().contiguous().t(), "grid", 1.0, False)
    w = torch.ones(16)[::2]
    with pytest.raises(RuntimeError, match="q_weight must be contiguous"):
        ops.qk_norm_rope_fwd(q.contiguous(), k, cu, packed.sizes, freqs, w, torch.zeros(8), torch.ones(8),
                             torch.zeros(8), 1e-5, "grid", 1.0)


# ---------------------------------------------------------------------------------------------
# packs of 1 to 200 images, awkward shapes, fuzzing against the reference
# ---------------------------------------------------------------------------------------------
EDGE = [(1, 1), (1, 9), (7, 1), (1, 2), (2, 1)]


@pytest.mark.parametrize("num_images", [1, 2, 17, 200])
@pytest.mark.parametrize("op", ADALN_OPS + ROPE_OPS)
def test_packs_of_many_sizes(op, num_images):
    sizes = (EDGE + random_sizes(num_images, max_side=7, seed=num_images))[:num_images]
    if num_images == 1:
        sizes = [(1, 1)]
    shape = {"dim": 37} if op in ADALN_OPS else {"heads": 2, "kv_heads": 1, "head_dim": 20}
    kw = {} if op in ADALN_OPS else {"positions": "official" if num_images % 2 else "grid"}
    check_against_reference(op, "cpu", _pack(sizes), torch.float32, shape=shape, **kw)


@pytest.mark.parametrize("op, positions", [("rope_2d", "grid"), ("rope_2d", "official"), ("qk_norm_rope", "grid")])
def test_rope_long_axis_matches_table_path(op, positions):
    """An image side longer than the per-axis cos/sin table evaluates angles per token, with the
    same values as the table; both agree with the reference."""
    long_side = 4100
    packed = _pack([(1, long_side), (3, 5)])
    check_against_reference(op, "cpu", packed, torch.float32, shape={"heads": 1, "head_dim": 8},
                            positions=positions)
    q, k, freqs, _, _ = _rope_args(packed, 1, 1, 8)
    both = nk.rope_2d(q, k, packed, freqs, positions=positions, backend="cpu")
    small = _pack([(3, 5)])
    alone = nk.rope_2d(q[long_side:], k[long_side:], small, freqs, positions=positions, backend="cpu")
    for a, b in zip(both, alone):
        assert torch.equal(a[long_side:], b)


def test_empty_images_in_cu_seqlens():
    """cu_seqlens with repeated entries (images without tokens) is valid for the AdaLN operators;
    their per-image gradients are zero."""
    cu = torch.tensor([0, 3, 3, 7, 7], dtype=torch.int32)
    n, b, d = 7, 4, 11
    g = torch.Generator().manual_seed(2)
    x, dy = torch.randn(2, n, d, generator=g).unbind(0)
    shift, scale = torch.randn(2, b, d, generator=g).unbind(0)
    y, mean, rstd = ops.adaln_modulate_fwd(x, shift, scale, cu, 1e-6)
    torch.testing.assert_close(y, nk.reference.adaln_modulate(x, shift, scale, cu), rtol=1e-5, atol=1e-5)
    dx, dshift, dscale = ops.adaln_modulate_bwd(dy, x, scale, mean, rstd, cu)
    assert torch.equal(dshift[[1, 3]], torch.zeros(2, d)) and torch.equal(dscale[[1, 3]], torch.zeros(2, d))
    torch.testing.assert_close(dshift[0], dy[:3].sum(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dshift[2], dy[3:].sum(0), rtol=1e-5, atol=1e-5)


def test_rope_inverse_undoes_rotation():
    packed = _pack([(3, 4), (1, 6), (5, 1)])
    q, k, freqs, _, _ = _rope_args(packed, 2, 1, 24)
    cu, sizes = packed.cu_seqlens, packed.sizes
    for positions in ("grid", "official"):
        qr, kr = ops.rope_2d(q, k, cu, sizes, freqs, positions, 1.5, False)
        qb, kb = ops.rope_2d(qr, kr, cu, sizes, freqs, positions, 1.5, True)
        torch.testing.assert_close(qb, q * 2.25, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(kb, k * 2.25, rtol=1e-5, atol=1e-5)


@st.composite
def _cases(draw):
    op = draw(st.sampled_from(ADALN_OPS + ROPE_OPS))
    sizes = draw(st.lists(st.tuples(st.integers(1, 9), st.integers(1, 9)), min_size=1, max_size=24))
    dtype = draw(st.sampled_from(DTYPES))
    if op in ADALN_OPS:
        return op, sizes, dtype, {"dim": draw(st.integers(1, 70))}, {}
    heads = draw(st.integers(1, 3))
    shape = {"heads": heads, "kv_heads": draw(st.sampled_from([1, heads])),
             "head_dim": 4 * draw(st.integers(1, 19))}
    kw = {"positions": draw(st.sampled_from(["grid", "official"])),
          "mscale": draw(st.sampled_from([1.0, 0.7, 1.3]))}
    return op, sizes, dtype, shape, kw


@settings(max_examples=40, deadline=None, derandomize=True)
@given(_cases(), st.integers(0, 2**16))
def test_fuzz_random_packs_against_reference(case, seed):
    op, sizes, dtype, shape, kw = case
    check_against_reference(op, "cpu", _pack(sizes), dtype, seed=seed, shape=shape, **kw)


# ---------------------------------------------------------------------------------------------
# bad input to the raw operators: RuntimeError with a message that says what was expected
# ---------------------------------------------------------------------------------------------
def _adaln_bad_calls():
    n, b, d = 10, 2, 8
    x, y = torch.randn(n, d), torch.randn(n, d)
    row = torch.randn(b, d)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    i32 = lambda *v: torch.tensor(v, dtype=torch.int32)  # noqa: E731
    fwd = lambda x=x, shift=row, scale=row, cu=cu: ops.adaln_modulate_fwd(x, shift, scale, cu, 1e-6)  # noqa: E731
    return [
        ("cu_not_zero", lambda: fwd(cu=i32(1, 4, 10)), r"cu_seqlens\[0\] must be 0, got 1"),
        ("cu_decreasing", lambda: fwd(cu=i32(0, 6, 4, 10)), r"must be non-decreasing, but cu_seqlens\[2\]=4"),
        ("cu_last", lambda: fwd(cu=i32(0, 4, 9)), r"cu_seqlens\[-1\]=9 must equal the number of tokens 10"),
        ("cu_dtype", lambda: fwd(cu=cu.long()), "cu_seqlens must be int32, got Long"),
        ("cu_2d", lambda: fwd(cu=cu[None]), "cu_seqlens must be 1-D"),
        ("cu_too_few", lambda: ops.gated_residual_fwd(x, y, row, i32(0, 4, 7, 10)), r"gate must have shape \[3, 8\]"),
        ("shift_rows", lambda: fwd(shift=torch.randn(b + 1, d)), r"shift must have shape \[2, 8\], got \[3, 8\]"),
        ("scale_cols", lambda: fwd(scale=torch.randn(b, d + 1)), r"scale must have shape \[2, 8\]"),
        ("x_1d", lambda: fwd(x=torch.randn(n)), r"x must be \[N, D\]"),
        ("dtype_mix", lambda: fwd(shift=row.half()), "shift has dtype Half but x has dtype Float"),
        ("float64", lambda: fwd(x=x.double(), shift=row.double(), scale=row.double()),
         "x must be float32, float16 or bfloat16, got Double"),
        ("int_input", lambda: fwd(x=x.int()), "x must be float32, float16 or bfloat16, got Int"),
        ("y_shape", lambda: ops.gated_residual_fwd(x, y[:-1], row, cu), r"y must have shape \[10, 8\]"),
        ("res_y_dtype", lambda: ops.residual_adaln_fwd(x, y.bfloat16(), row, row, row, cu, 1e-6),
         "y has dtype BFloat16 but x has dtype Float"),
        ("bwd_mean_shape", lambda: ops.adaln_modulate_bwd(x, x, row, torch.zeros(n + 1), torch.ones(n), cu),
         r"mean must have shape \[10\]"),
        ("bwd_rstd_dtype", lambda: ops.adaln_modulate_bwd(x, x, row, torch.zeros(n), torch.ones(n).double(), cu),
         "rstd must be float32, got Double"),
        ("res_bwd_gate", lambda: ops.residual_adaln_bwd(x, x, x, y, row[:1], row, torch.zeros(n), torch.ones(n), cu),
         r"gate must have shape \[2, 8\]"),
        ("gated_bwd_dout", lambda: ops.gated_residual_bwd(x.half(), y, row, cu), "dout has dtype Half but y"),
    ]


@pytest.mark.parametrize("name, call, message", _adaln_bad_calls(), ids=[c[0] for c in _adaln_bad_calls()])
def test_adaln_family_rejects_bad_input(name, call, message):
    with pytest.raises(RuntimeError, match=message):
        call()


def _rope_bad_calls():
    packed = _pack([(2, 3), (2, 2)])
    cu, sizes = packed.cu_seqlens, packed.sizes
    n, dh = packed.total_tokens, 8
    q, k = torch.randn(n, 2, dh), torch.randn(n, 1, dh)
    freqs = nk.rope_freqs(dh)
    w, b = torch.ones(dh), torch.zeros(dh)
    st_q, st_k = torch.zeros(n, 2), torch.zeros(n, 1)
    i32 = lambda *v: torch.tensor(v, dtype=torch.int32)  # noqa: E731

    def rope(q=q, k=k, cu=cu, sizes=sizes, freqs=freqs, positions="grid"):
        return ops.rope_2d(q, k, cu, sizes, freqs, positions, 1.0, False)

    def qkn(q=q, k=k, qw=w, qb=b, positions="grid"):
        return ops.qk_norm_rope_fwd(q, k, cu, sizes, freqs, qw, qb, w, b, 1e-5, positions, 1.0)

    def qkn_bwd(dq=q, dk=k, q_mean=st_q, k_rstd=st_k, kw=w):
        return ops.qk_norm_rope_bwd(dq, dk, q, k, cu, sizes, freqs, w, kw, q_mean, st_q, st_k, k_rstd, "grid", 1.0)

    return [
        ("positions", lambda: rope(positions="xy"), 'positions must be "grid" or "official", got "xy"'),
        ("positions_qkn", lambda: qkn(positions="Grid"), 'positions must be "grid" or "official"'),
        ("head_dim", lambda: rope(q=torch.randn(n, 2, 6), k=torch.randn(n, 1, 6), freqs=torch.ones(2, 1)),
         "head_dim must be a positive multiple of 4"),
        ("k_head_dim", lambda: rope(k=torch.randn(n, 1, 12)), r"k must have the tokens and head_dim of q"),
        ("k_tokens", lambda: rope(k=torch.randn(n - 1, 1, dh)), r"k must have the tokens and head_dim of q"),
        ("k_dtype", lambda: rope(k=k.half()), "k has dtype Half but q has dtype Float"),
        ("q_2d", lambda: rope(q=torch.randn(n, dh), k=torch.randn(n, dh)), r"q must be \[N, H, Dh\]"),
        ("freqs_shape", lambda: rope(freqs=nk.rope_freqs(2 * dh)), r"freqs must have shape \[2, 2\], got \[2, 4\]"),
        ("freqs_dtype", lambda: rope(freqs=freqs.double()), "freqs must be float32, got Double"),
        ("cu_last", lambda: rope(cu=i32(0, 6, 9)), r"cu_seqlens\[-1\]=9 must equal the number of tokens 10"),
        ("cu_not_zero", lambda: rope(cu=i32(2, 6, 10)), r"cu_seqlens\[0\] must be 0"),
        ("cu_dtype", lambda: rope(cu=cu.long()), "cu_seqlens must be int32"),
        ("sizes_mismatch", lambda: rope(sizes=i32(2, 3, 1, 3).reshape(2, 2)),
         r"sizes\[1\]=\(1, 3\) holds 3 tokens but cu_seqlens gives 4"),
        ("sizes_shape", lambda: rope(sizes=sizes[:1]), r"sizes must have shape \[2, 2\]"),
        ("sizes_nonpositive", lambda: rope(sizes=i32(2, 3, 0, 4).reshape(2, 2)), "must be positive"),
        ("sizes_dtype", lambda: rope(sizes=sizes.long()), "sizes must be int32"),
        ("weight_dtype", lambda: qkn(qw=w.half()), "q_weight must be float32, got Half"),
        ("bias_shape", lambda: qkn(qb=torch.zeros(dh + 4)), r"q_bias must have shape \[8\]"),
        ("bwd_grad_shape", lambda: qkn_bwd(dq=torch.randn(n, 1, dh)), r"dq_rot must have shape \[10, 2, 8\]"),
        ("bwd_grad_dtype", lambda: qkn_bwd(dq=q.bfloat16(), dk=k.bfloat16()), "dq_rot has dtype BFloat16 but q"),
        ("bwd_stats", lambda: qkn_bwd(q_mean=st_k), r"q_mean must have shape \[10, 2\], got \[10, 1\]"),
        ("bwd_stats_dtype", lambda: qkn_bwd(k_rstd=st_k.half()), "k_rstd must be float32"),
        ("bwd_weight", lambda: qkn_bwd(kw=torch.ones(dh, 1)), r"k_weight must have shape \[8\]"),
    ]


@pytest.mark.parametrize("name, call, message", _rope_bad_calls(), ids=[c[0] for c in _rope_bad_calls()])
def test_rope_family_rejects_bad_input(name, call, message):
    with pytest.raises(RuntimeError, match=message):
        call()
