"""The CPU varlen attention kernels (nit::varlen_attention_fwd / _bwd, backend "cpu").

tests/test_ops_conformance.py covers the dtype x head_dim x causal grid on packs with equal query
and key lengths; this module covers what it does not: cross lengths, empty sequences, rows that
see no key, the saved log-sum-exp, grouped-query heads, long images split across backward tasks,
thread-count determinism, both vector widths, registration (opcheck, torch.compile), fuzzed packs,
NaN/inf propagation, a huge softmax_scale and bad input. Forward and gradients are judged against
the float64 reference by the accuracy rule of nit_kernels.testing (error <= 2x that of the float32
reference + a small atol).
"""
import contextlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import nit_kernels as nk
from nit_kernels import dispatch
from nit_kernels.dispatch import Call
from nit_kernels.reference import attention_math, attention_math_backward
from nit_kernels.testing import assert_accuracy, assert_close, random_sizes

CPU = dispatch.get("cpu")
pytestmark = pytest.mark.skipif(not CPU.implements("varlen_attention"),
                                reason=f"cpu backend has no varlen_attention: {CPU.load_error()}")
ENV_BITS = "NIT_CPU_ATTENTION_VECTOR_BITS"


@contextlib.contextmanager
def _one_thread():
    """The float64 oracle runs thousands of tiny ops; one thread keeps it fast on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _cu(lens):
    return torch.tensor([0] + list(lens), dtype=torch.int64).cumsum(0).to(torch.int32)


def _inputs(lq, lk, heads, kv_heads, head_dim, dv, seed):
    g = torch.Generator().manual_seed(seed)
    nq, nk_ = sum(lq), sum(lk)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    return r(nq, heads, head_dim), r(nk_, kv_heads, head_dim), r(nk_, kv_heads, dv), r(nq, heads, dv)


def _fwd(q, k, v, cu_q, cu_k, scale, causal):
    mq, mk = int((cu_q[1:] - cu_q[:-1]).max()), int((cu_k[1:] - cu_k[:-1]).max())
    return torch.ops.nit.varlen_attention_fwd(q, k, v, cu_q, cu_k, mq, mk, scale, causal)


def _bwd(do, q, k, v, out, lse, cu_q, cu_k, scale, causal):
    mq, mk = int((cu_q[1:] - cu_q[:-1]).max()), int((cu_k[1:] - cu_k[:-1]).max())
    return torch.ops.nit.varlen_attention_bwd(do, q, k, v, out, lse, cu_q, cu_k, mq, mk, scale, causal)


def _reference_lse(q, k, cu_q, cu_k, scale, causal):
    """float64 log-sum-exp [H, Nq] of the visible scores of each query row (-inf if none)."""
    group = q.shape[1] // k.shape[1]
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float64)
    for q0, q1, k0, k1 in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), cu_k[:-1].tolist(), cu_k[1:].tolist()):
        if q1 == q0 or k1 == k0:
            continue
        kk = k[k0:k1].double().repeat_interleave(group, dim=1)
        s = torch.einsum("qhd,khd->hqk", q[q0:q1].double(), kk) * scale
        if causal:
            rows = torch.arange(q1 - q0)[:, None]
            allowed = torch.arange(k1 - k0)[None, :] <= rows + (k1 - k0) - (q1 - q0)
            s = s.masked_fill(~allowed, float("-inf"))
        lse[:, q0:q1] = torch.logsumexp(s, dim=-1)
    return lse


def _scale_of(t):
    return max(1.0, t.abs().max().item()) if t.numel() else 1.0


def attention_case(lq, lk, heads, kv_heads, head_dim, dv, scale, seed, inputs=None):
    """cu_seqlens_q, cu_seqlens_k, the softmax scale and (q, k, v, dout) in float64 of one check;
    lk, kv_heads, dv and scale default to lq, heads, head_dim and head_dim**-0.5; `inputs` makes
    the tensors (default _inputs)."""
    lk = lq if lk is None else lk
    kv_heads, dv = kv_heads or heads, dv or head_dim
    scale = head_dim ** -0.5 if scale is None else scale
    return _cu(lq), _cu(lk), scale, (inputs or _inputs)(lq, lk, heads, kv_heads, head_dim, dv, seed)


def reference_pair(hi, lo, cu_q, cu_k, scale, causal):
    """The two sides of the accuracy rule: the reference out and (dq, dk, dv) on the float64
    inputs hi = (q, k, v, dout) and on the same inputs in the kernel's dtype, lo."""
    with _one_thread():
        outs = tuple(attention_math(*t[:3], cu_q, cu_k, scale, causal) for t in (hi, lo))
        grads = tuple(attention_math_backward(t[3], *t[:3], cu_q, cu_k, scale, causal) for t in (hi, lo))
    return outs, grads


def check_pack(lq, lk=None, *, heads=2, kv_heads=None, head_dim=64, dv=None, causal=False, scale=None, seed=0):
    """fp32 kernel forward, lse and (dq, dk, dv) against the float64 reference."""
    cu_q, cu_k, scale, (q, k, v, do) = attention_case(lq, lk, heads, kv_heads, head_dim, dv, scale, seed)
    f32 = [t.float() for t in (q, k, v, do)]
    out, lse = _fwd(*f32[:3], cu_q, cu_k, scale, causal)
    grads = _bwd(f32[3], *f32[:3], out, lse, cu_q, cu_k, scale, causal)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert out.shape == (sum(lq), heads, v.shape[2]) and lse.shape == (heads, sum(lq))
    (ref64, ref32), (g64, g32) = reference_pair((q, k, v, do), f32, cu_q, cu_k, scale, causal)
    with _one_thread():
        ref_lse = _reference_lse(q, k, cu_q, cu_k, scale, causal)
    assert_accuracy(out, ref64, ref32, name="out", atol=1e-5 * _scale_of(ref64))
    assert_close(lse, ref_lse, atol=1e-5 * _scale_of(ref_lse[torch.isfinite(ref_lse)]), name="lse")
    for name, gk, gh, gl in zip(("dq", "dk", "dv"), grads, g64, g32):
        assert gk.shape == gh.shape and gk.dtype == torch.float32
        assert_accuracy(gk, gh, gl, name=name, atol=1e-5 * _scale_of(gh))
    return out, lse, grads


# ------------------------------------------------------------------------------------------------
# semantics
# ------------------------------------------------------------------------------------------------
CROSS = {
    "more-keys": ([5, 100, 37], [9, 130, 37]),
    "more-queries": ([9, 130, 40], [5, 100, 39]),
    "mixed": ([1, 64, 65, 7], [70, 63, 1, 8]),
}


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("lens", CROSS.values(), ids=CROSS.keys())
def test_cross_lengths(lens, causal):
    check_pack(*lens, head_dim=72, causal=causal)


def test_causal_aligns_bottom_right_and_rows_without_keys_are_zero():
    # 6 queries, 2 keys: query i sees keys j <= i - 4, so rows 0..3 see nothing
    out, lse, (dq, dk, dv) = check_pack([6], [2], heads=3, causal=True)
    assert torch.equal(out[:4], torch.zeros_like(out[:4]))
    assert torch.isneginf(lse[:, :4]).all() and torch.isfinite(lse[:, 4:]).all()
    assert torch.equal(dq[:4], torch.zeros_like(dq[:4]))
    for t in (out, dq, dk, dv):
        assert torch.isfinite(t).all()
    # row 4 sees exactly key 0: its output is v[0] and its lse the single score
    q, k, v, _ = _inputs([6], [2], 3, 3, 64, 64, 0)
    torch.testing.assert_close(out[4], v[0].float(), rtol=0, atol=1e-6)
    torch.testing.assert_close(lse[:, 4], (q[4] * k[0]).sum(-1).float() * 64 ** -0.5, rtol=0, atol=1e-5)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_empty_sequences(causal):
    lq, lk = [0, 7, 0, 3, 5, 0], [4, 0, 0, 6, 5, 0]
    out, lse, (dq, dk, dv) = check_pack(lq, lk, causal=causal)
    cq, ck = _cu(lq), _cu(lk)
    # image 1 has queries but no keys: output 0, lse -inf, dq 0; image 0 has keys but no queries: dk = dv = 0
    assert torch.equal(out[cq[1]:cq[2]], torch.zeros_like(out[cq[1]:cq[2]]))
    assert torch.isneginf(lse[:, cq[1]:cq[2]]).all()
    assert torch.equal(dq[cq[1]:cq[2]], torch.zeros_like(dq[cq[1]:cq[2]]))
    assert torch.equal(dk[ck[0]:ck[1]], torch.zeros_like(dk[ck[0]:ck[1]]))
    assert torch.equal(dv[ck[0]:ck[1]], torch.zeros_like(dv[ck[0]:ck[1]]))


def test_all_sequences_empty():
    out, lse, grads = check_pack([0, 0], [0, 0])
    assert out.shape == (0, 2, 64) and lse.shape == (2, 0)
    assert all(g.shape[0] == 0 for g in grads)


@pytest.mark.parametrize("kv_heads, dv", [(1, 64), (2, 40)], ids=["gqa-4", "gqa-2-dv40"])
def test_grouped_query_heads_and_value_head_dim(kv_heads, dv):
    check_pack([17, 40, 3], [20, 33, 3], heads=4, kv_heads=kv_heads, dv=dv, causal=True)


@pytest.mark.parametrize("head_dim", [1, 13, 96, 160])
def test_any_head_dim(head_dim):
    check_pack([3, 70], [5, 66], head_dim=head_dim, causal=head_dim % 2 == 1)


@pytest.mark.parametrize("scale", [0.0, 0.3, -0.2])
def test_softmax_scale(scale):
    check_pack([10, 33], [12, 30], scale=scale, causal=True)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_long_image_split_over_backward_tasks(causal):
    # more than 512 queries: the backward splits the image and sums partial dK/dV
    check_pack([1300, 5], [1100, 9], heads=2, kv_heads=1, head_dim=24, causal=causal)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_cross_lengths(dtype):
    lq, lk = [3, 50, 20], [7, 41, 20]
    cu_q, cu_k = _cu(lq), _cu(lk)
    q, k, v, do = (t.to(dtype).double() for t in _inputs(lq, lk, 4, 2, 72, 72, 3))
    scale = 72 ** -0.5
    lo = [t.to(dtype) for t in (q, k, v, do)]
    out, lse = _fwd(*lo[:3], cu_q, cu_k, scale, True)
    grads = _bwd(lo[3], *lo[:3], out, lse, cu_q, cu_k, scale, True)
    assert out.dtype == dtype and lse.dtype == torch.float32 and all(g.dtype == dtype for g in grads)
    with _one_thread():
        ref = attention_math(q, k, v, cu_q, cu_k, scale, True)
        ref_lo = attention_math(*lo[:3], cu_q, cu_k, scale, True)
        g_ref = attention_math_backward(do, q, k, v, cu_q, cu_k, scale, True)
        g_lo = attention_math_backward(lo[3], *lo[:3], cu_q, cu_k, scale, True)
    assert_accuracy(out, ref, ref_lo, name="out", atol=1e-3 * _scale_of(ref))
    for name, gk, gh, gl in zip(("dq", "dk", "dv"), grads, g_ref, g_lo):
        assert_accuracy(gk, gh, gl, name=name, atol=1e-3 * _scale_of(gh))


@pytest.mark.parametrize("num_images", [1, 2, 37, 200])
def test_packs_of_1_to_200_images(num_images):
    lens = [h * w for h, w in random_sizes(num_images, max_side=6, seed=num_images)]
    check_pack(lens, heads=2, head_dim=32, causal=num_images % 2 == 0)


@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_fuzz_random_packs(data):
    b = data.draw(st.integers(1, 6), label="images")
    lq = data.draw(st.lists(st.integers(0, 90), min_size=b, max_size=b), label="lq")
    same = data.draw(st.booleans(), label="same lengths")
    lk = lq if same else data.draw(st.lists(st.integers(0, 90), min_size=b, max_size=b), label="lk")
    kv_heads = data.draw(st.integers(1, 2), label="kv_heads")
    group = data.draw(st.sampled_from([1, 2, 3]), label="group")
    head_dim = data.draw(st.sampled_from([8, 13, 64, 72]), label="head_dim")
    causal = data.draw(st.booleans(), label="causal")
    check_pack(lq, lk, heads=kv_heads * group, kv_heads=kv_heads, head_dim=head_dim, causal=causal,
               seed=data.draw(st.integers(0, 1000), label="seed"))


# ------------------------------------------------------------------------------------------------
# determinism and vector widths
# ------------------------------------------------------------------------------------------------
def _run_all(lq, lk, causal, seed=5):
    q, k, v, do = (t.float() for t in _inputs(lq, lk, 4, 2, 72, 72, seed))
    cu_q, cu_k = _cu(lq), _cu(lk)
    out, lse = _fwd(q, k, v, cu_q, cu_k, 0.1, causal)
    return (out, lse) + tuple(_bwd(do, q, k, v, out, lse, cu_q, cu_k, 0.1, causal))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_thread_count_does_not_change_results(causal):
    lq, lk = [700, 1, 130, 64, 0, 300], [650, 2, 130, 70, 3, 300]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run_all(lq, lk, causal)
        torch.set_num_threads(2)
        two = _run_all(lq, lk, causal)
    finally:
        torch.set_num_threads(before)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), one, two):
        assert torch.equal(a, b), f"{name} differs between 1 and 2 threads: {(a - b).abs().max()}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_scratch_left_by_an_earlier_call_does_not_leak(dtype):
    # each thread keeps its scratch across calls: a large call full of NaN and inf must leave no
    # trace in the bits of a later, smaller one
    def run(lq, lk, poison):
        q, k, v, do = (t.to(dtype) for t in _inputs(lq, lk, 4, 2, 72, 72, 9))
        if poison:
            for t in (q, k, v, do):
                t[::3] = float("nan")
                t[1::3] = float("inf")
        cu_q, cu_k = _cu(lq), _cu(lk)
        out, lse = _fwd(q, k, v, cu_q, cu_k, 0.2, False)
        return (out, lse) + tuple(_bwd(do, q, k, v, out, lse, cu_q, cu_k, 0.2, False))

    small = ([37, 5], [41, 3])
    with _one_thread():
        first = run(*small, poison=False)
        run([1100, 300], [1100, 290], poison=True)
        again = run(*small, poison=False)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), first, again):
        assert torch.isfinite(a).all() and torch.equal(a, b), f"{name} changed after a poisoned call"


def _has_avx512():
    return torch.backends.cpu.get_cpu_capability() == "AVX512"


@pytest.mark.skipif(not _has_avx512(), reason="the CPU has no AVX-512: only the 256-bit kernels run")
@pytest.mark.parametrize("bits", ["256", "512"])
def test_both_vector_widths_match_the_reference(bits, monkeypatch):
    monkeypatch.setenv(ENV_BITS, bits)
    check_pack([5, 130, 64], [9, 100, 64], heads=4, kv_heads=2, head_dim=72, causal=True)
    check_pack([1100], [1100], heads=1, head_dim=40)


def test_vector_width_setting_is_checked(monkeypatch):
    monkeypatch.setenv(ENV_BITS, "128")
    with pytest.raises(RuntimeError, match="must be 256 or 512, got '128'"):
        _run_all([4], [4], False)
    if not _has_avx512():
        monkeypatch.setenv(ENV_BITS, "512")
        with pytest.raises(RuntimeError, match="AVX-512"):
            _run_all([4], [4], False)


# ------------------------------------------------------------------------------------------------
# public API, registration, compile
# ------------------------------------------------------------------------------------------------
def test_public_api_serves_grouped_query_heads_with_autograd():
    assert CPU.refuse(Call("varlen_attention", torch.device("cpu"), torch.float32, head_dim=72, gqa=True)) is None
    packed = nk.PackedSeqs.from_sizes([(3, 5), (1, 1), (7, 6)])
    q, k, v, do = _inputs([15, 1, 42], [15, 1, 42], 6, 2, 72, 72, 1)
    leaves = [t.float().requires_grad_() for t in (q, k, v)]
    cu, m = packed.cu_seqlens, packed.max_seqlen
    out = nk.varlen_attention(*leaves, cu, cu, m, m, backend="cpu")
    grads = torch.autograd.grad(out, leaves, do.float())
    assert_accuracy(out, attention_math(q, k, v, cu, cu, 72 ** -0.5, False),
                    attention_math(*(t.detach() for t in leaves), cu, cu, 72 ** -0.5, False), name="out")
    for name, gk, gh in zip(("dq", "dk", "dv"), grads, attention_math_backward(do, q, k, v, cu, cu, 72 ** -0.5, False)):
        assert_close(gk, gh, atol=1e-5 * _scale_of(gh), name=name)


def _op_args(causal):
    lq, lk = [3, 9, 0, 5], [4, 9, 2, 5]
    q, k, v, do = (t.float() for t in _inputs(lq, lk, 4, 2, 16, 16, 2))
    return q, k, v, do, _cu(lq), _cu(lk), max(lq), max(lk)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_opcheck_forward(causal):
    q, k, v, _, cu_q, cu_k, mq, mk = _op_args(causal)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), cu_q, cu_k, mq, mk, 0.25, causal)
    torch.library.opcheck(torch.ops.nit.varlen_attention_fwd.default, args)


def test_opcheck_backward():
    q, k, v, do, cu_q, cu_k, mq, mk = _op_args(True)
    out, lse = torch.ops.nit.varlen_attention_fwd(q, k, v, cu_q, cu_k, mq, mk, 0.25, True)
    torch.library.opcheck(torch.ops.nit.varlen_attention_bwd.default,
                          (do, q, k, v, out, lse, cu_q, cu_k, mq, mk, 0.25, True))


def test_torch_compile_fullgraph_forward_and_backward():
    packed = nk.PackedSeqs.from_sizes([(2, 3), (5, 5), (1, 4)])
    cu, m = packed.cu_seqlens, packed.max_seqlen
    q, k, v, do = (t.float() for t in _inputs([6, 25, 4], [6, 25, 4], 4, 2, 64, 64, 4))

    def f(q, k, v):
        return nk.varlen_attention(q, k, v, cu, cu, m, m, causal=True, backend="cpu")

    compiled = torch.compile(f, fullgraph=True)
    results = []
    for fn in (f, compiled):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        results.append((out, *torch.autograd.grad(out, leaves, do)))
    for name, a, b in zip(("out", "dq", "dk", "dv"), *results):
        assert torch.equal(a, b), f"{name}: compiled differs from eager by {(a - b).abs().max()}"


# ------------------------------------------------------------------------------------------------
# bad input straight to the ops: clear RuntimeErrors, never a crash
# ------------------------------------------------------------------------------------------------
def _good():
    q, k, v, do, cu_q, cu_k, mq, mk = _op_args(False)
    return dict(q=q, k=k, v=v, cu_q=cu_q, cu_k=cu_k, mq=mq, mk=mk, scale=0.25, causal=False)


def _call_fwd(a):
    return torch.ops.nit.varlen_attention_fwd(a["q"], a["k"], a["v"], a["cu_q"], a["cu_k"], a["mq"], a["mk"],
                                              a["scale"], a["causal"])


FWD_BAD = {
    "q float64": (dict(q=lambda a: a["q"].double()), "q must be float32, float16 or bfloat16, got Double"),
    "k other dtype": (dict(k=lambda a: a["k"].half()), "k has dtype Half but q has dtype Float"),
    "q 2-D": (dict(q=lambda a: a["q"].flatten(1)), r"q must be \[Nq, H, D\], got shape \[17, 64\]"),
    "q strided": (dict(q=lambda a: a["q"].transpose(1, 2).contiguous().transpose(1, 2)), "q must be contiguous"),
    "k head_dim": (dict(k=lambda a: a["k"][..., :8].contiguous()), "q and k must share head_dim, got 16 and 8"),
    "v tokens": (dict(v=lambda a: a["v"][1:].contiguous()), "v must have k's tokens and heads"),
    "heads": (dict(q=lambda a: a["q"][:, :3].contiguous()), r"q heads \(3\) must be a positive multiple of k/v heads \(2\)"),
    "head_dim 0": (dict(q=lambda a: a["q"][..., :0], k=lambda a: a["k"][..., :0]), "head_dim must be positive"),
    "cu int64": (dict(cu_q=lambda a: a["cu_q"].long()), "cu_seqlens_q must be int32, got Long"),
    "cu 2-D": (dict(cu_k=lambda a: a["cu_k"][None]), "cu_seqlens_k must be 1-D"),
    "cu total": (dict(cu_q=lambda a: a["cu_q"] - torch.tensor([0, 0, 0, 0, 1], dtype=torch.int32)),
                 r"cu_seqlens_q\[-1\]=16 must equal the number of tokens 17"),
    "cu start": (dict(cu_k=lambda a: a["cu_k"] + 1), r"cu_seqlens_k\[0\] must be 0, got 1"),
    "cu decreasing": (dict(cu_q=lambda a: torch.tensor([0, 13, 12, 12, 17], dtype=torch.int32)),
                      "cu_seqlens_q must be non-decreasing"),
    "cu counts": (dict(cu_k=lambda a: torch.tensor([0, 20], dtype=torch.int32)),
                  "must describe the same number of sequences, got 4 and 1"),
    "max_seqlen_q": (dict(mq=lambda a: 8), r"max_seqlen_q=8 is smaller than the longest query sequence \(9\)"),
    "max_seqlen_k": (dict(mk=lambda a: -1), r"max_seqlen_k=-1 is smaller than the longest key sequence \(9\)"),
    "scale nan": (dict(scale=lambda a: float("nan")), "softmax_scale must be finite"),
}


@pytest.mark.parametrize("case", FWD_BAD, ids=list(FWD_BAD))
def test_forward_rejects_bad_input(case):
    changes, match = FWD_BAD[case]
    a = _good()
    a.update({key: fn(a) for key, fn in changes.items()})
    with pytest.raises(RuntimeError, match=match):
        _call_fwd(a)


BWD_BAD = {
    "lse shape": (lambda t: t.update(lse=t["lse"].t().contiguous()), r"lse must have shape \[4, 17\], got \[17, 4\]"),
    "lse dtype": (lambda t: t.update(lse=t["lse"].double()), "lse must be float32, got Double"),
    "dout shape": (lambda t: t.update(do=t["do"][:-1].contiguous()), r"dout must have shape \[17, 4, 16\]"),
    "out dtype": (lambda t: t.update(out=t["out"].half()), "out has dtype Half but q has dtype Float"),
    "dout strided": (lambda t: t.update(do=t["do"].transpose(0, 1).contiguous().transpose(0, 1)),
                     "dout must be contiguous"),
    "max_seqlen_k": (lambda t: t.update(mk=3), "max_seqlen_k=3 is smaller than the longest key sequence"),
}


@pytest.mark.parametrize("case", BWD_BAD, ids=list(BWD_BAD))
def test_backward_rejects_bad_input(case):
    mutate, match = BWD_BAD[case]
    q, k, v, do, cu_q, cu_k, mq, mk = _op_args(False)
    out, lse = torch.ops.nit.varlen_attention_fwd(q, k, v, cu_q, cu_k, mq, mk, 0.25, False)
    t = dict(do=do, out=out, lse=lse, mk=mk)
    mutate(t)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.nit.varlen_attention_bwd(t["do"], q, k, v, t["out"], t["lse"], cu_q, cu_k, mq, t["mk"], 0.25, False)


# ------------------------------------------------------------------------------------------------
# non-finite input: NaN propagates as in the reference, forward and backward, both vector widths
# ------------------------------------------------------------------------------------------------
def _poison(name, rows, heads=slice(None), dims=slice(None), value=float("nan")):
    def f(t):
        t[name][rows, heads, dims] = value
    return f


NONFINITE = {
    "nan in one query row": ([10, 10], [10, 10], False, _poison("q", 3, 0)),
    "one nan in k": ([10, 10], [10, 10], False, _poison("k", 2, 1, 0)),
    "one nan in v": ([10, 10], [10, 10], False, _poison("v", 12, 0, 5)),
    "all keys of an image nan": ([10, 10], [10, 10], False, _poison("k", slice(0, 10))),
    "all keys of an image -inf": ([10, 10], [10, 10], False, _poison("k", slice(0, 10), value=float("-inf"))),
    "inf in one query row": ([10, 10], [10, 10], False, _poison("q", 14, 1, value=float("inf"))),
    "nan row among 130 keys": ([70, 5], [130, 5], False, _poison("q", 40, 0)),
    "nan key in a later tile": ([70, 5], [130, 5], False, _poison("k", 100, 1, 3)),
    # 6 queries, 2 keys: rows 0..3 see no key and stay 0 even with a NaN query; rows 4, 5 see k[0]
    "causal, nan query of a row without keys": ([6], [2], True, _poison("q", 1)),
    "causal, nan query of a row with keys": ([6], [2], True, _poison("q", 5, 0)),
    "causal, nan in the first key": ([6, 3], [2, 3], True, _poison("k", 0, 1, 2)),
}


def _autograd_run(backend, q, k, v, do, cu_q, cu_k, scale, causal):
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    mq, mk = int((cu_q[1:] - cu_q[:-1]).max()), int((cu_k[1:] - cu_k[:-1]).max())
    out = nk.varlen_attention(*leaves, cu_q, cu_k, mq, mk, softmax_scale=scale, causal=causal, backend=backend)
    return (out,) + torch.autograd.grad(out, leaves, do)


def _check_like_reference(lq, lk, causal, t, scale, atol_rel=1e-5):
    """cpu forward and gradients (fp32) against the float64 reference: same NaN/inf positions, close elsewhere."""
    cu_q, cu_k = _cu(lq), _cu(lk)
    with _one_thread():
        ref = _autograd_run("reference", t["q"], t["k"], t["v"], t["do"], cu_q, cu_k, scale, causal)
    got = _autograd_run("cpu", *(t[n].float() for n in ("q", "k", "v", "do")), cu_q, cu_k, scale, causal)
    for name, a, e in zip(("out", "dq", "dk", "dv"), got, ref):
        finite = e[torch.isfinite(e)]
        assert_close(a, e, atol=atol_rel * max(1.0, finite.abs().max().item() if finite.numel() else 1.0), name=name)
    return got, ref


@pytest.mark.parametrize("bits", ["256", "512"])
@pytest.mark.parametrize("case", NONFINITE, ids=list(NONFINITE))
def test_nan_and_inf_propagate_like_the_reference(case, bits, monkeypatch):
    if bits == "512" and not _has_avx512():
        pytest.skip("the CPU has no AVX-512")
    monkeypatch.setenv(ENV_BITS, bits)
    lq, lk, causal, poison = NONFINITE[case]
    q, k, v, do = _inputs(lq, lk, 2, 2, 16, 16, 7)
    t = dict(q=q, k=k, v=v, do=do)
    poison(t)
    (out, dq, dk, dv), _ = _check_like_reference(lq, lk, causal, t, 0.25)
    assert torch.isnan(out).any() or case.startswith("causal, nan query of a row without"), "nothing propagated"


def check_nan_query_rows(fwd):
    """fwd(q, k, v, cu_q, cu_k, scale, causal) -> (out, lse): a NaN query gives a NaN row and lse,
    rows that see no key by the causal mask keep out 0 and lse -inf, the other rows stay finite."""
    lq, lk = [6], [2]
    q, k, v, _ = (t.float() for t in _inputs(lq, lk, 2, 2, 16, 16, 3))
    q[5, 0] = float("nan")
    out, lse = fwd(q, k, v, _cu(lq), _cu(lk), 0.25, True)
    assert torch.isnan(lse[0, 5]) and torch.isnan(out[5, 0]).all()
    assert torch.equal(out[:4], torch.zeros_like(out[:4])) and torch.isneginf(lse[:, :4]).all()
    assert torch.isfinite(out[4:, 1]).all() and torch.isfinite(lse[1, 4:]).all()


def test_nan_query_gives_nan_lse_and_the_documented_zero_rows_stay():
    check_nan_query_rows(_fwd)


@pytest.mark.parametrize("bits", ["256", "512"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_huge_softmax_scale_gives_the_reference_gradients(causal, bits, monkeypatch):
    # scale 1e30: every softmax row is one-hot; the gradients must not blow up (NaN/inf in dk, dv)
    if bits == "512" and not _has_avx512():
        pytest.skip("the CPU has no AVX-512")
    monkeypatch.setenv(ENV_BITS, bits)
    lq, lk = [10, 10, 70], [10, 10, 70]
    for seed in range(6):
        for head_dim in (16, 64):
            q, k, v, do = _inputs(lq, lk, 2, 2, head_dim, head_dim, seed)
            got, _ = _check_like_reference(lq, lk, causal, dict(q=q, k=k, v=v, do=do), 1e30)
            assert all(torch.isfinite(g).all() for g in got)
