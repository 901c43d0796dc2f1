"""The reference ops are the spec: check them against independent formulations."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import nit_kernels as nk
from nit_kernels import PackedSeqs
from nit_kernels.dispatch import OPS
from nit_kernels.testing import (ACTIVATIONS, ODD_PACKS, assert_close, call_op, cast_inputs, op_inputs,
                                 random_sizes)

PACKS = list(ODD_PACKS) + [tuple(random_sizes(9, seed=3))]
PER_IMAGE_ROWS = {"shift", "scale", "gate"}


def _slice_inputs(inputs, packed, i):
    cu = packed.cu_seqlens.tolist()
    out = {}
    for k, v in inputs.items():
        if k in PER_IMAGE_ROWS:
            out[k] = v[i:i + 1]
        elif k in ("x", "y", "q", "k", "v"):
            out[k] = v[cu[i]:cu[i + 1]]
        else:
            out[k] = v
    return out


def _tuple(o):
    return tuple(o) if isinstance(o, tuple) else (o,)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("sizes", PACKS, ids=lambda s: f"{len(s)}imgs")
def test_packing_invariance_forward_and_grads(op, sizes):
    """An op on a pack equals the op on each image alone, concatenated (forward and gradients)."""
    packed = PackedSeqs.from_sizes(sizes)
    shape = {"head_dim": 8, "heads": 2} if op in ("rope_2d", "qk_norm_rope", "varlen_attention") else {"dim": 13}
    base = op_inputs(op, packed, **shape)
    inp = cast_inputs(op, base, torch.float64, torch.float64)
    outs = _tuple(call_op(op, packed, inp, "reference"))
    gos = [torch.randn_like(o) for o in outs]
    names = [k for k, v in inp.items() if v.requires_grad]
    grads = torch.autograd.grad(outs, [inp[k] for k in names], gos)

    pieces = [[] for _ in outs]
    grad_pieces = {k: [] for k in names}
    cu = packed.cu_seqlens.tolist()
    for i, (h, w) in enumerate(packed.size_list):
        one = PackedSeqs.from_sizes([(h, w)])
        sub = cast_inputs(op, _slice_inputs(base, packed, i), torch.float64, torch.float64)
        o = _tuple(call_op(op, one, sub, "reference"))
        g = torch.autograd.grad(o, [sub[k] for k in names], [go[cu[i]:cu[i + 1]] for go in gos])
        for j, t in enumerate(o):
            pieces[j].append(t)
        for k, t in zip(names, g):
            grad_pieces[k].append(t)
    for j, o in enumerate(outs):
        assert_close(o, torch.cat(pieces[j]), atol=1e-12, rtol=1e-12, name=f"{op} output {j}")
    for k, g in zip(names, grads):
        if k in PER_IMAGE_ROWS:
            expect = torch.cat(grad_pieces[k])
        elif k in ("x", "y", "q", "k", "v"):
            expect = torch.cat(grad_pieces[k])
        else:  # shared parameters: gradients add up over images
            expect = torch.stack(grad_pieces[k]).sum(0)
        assert_close(g, expect, atol=1e-10, rtol=1e-10, name=f"{op} d{k}")


def test_adaln_matches_layer_norm_formula():
    packed = PackedSeqs.from_sizes([(2, 3), (1, 1), (4, 2)])
    x = torch.randn(packed.total_tokens, 40)
    shift, scale = torch.randn(2, 3, 40)
    seg = torch.repeat_interleave(torch.arange(3), packed.seqlens.long())
    expect = F.layer_norm(x, (40,), eps=1e-6) * (1 + scale[seg]) + shift[seg]
    assert_close(nk.adaln_modulate(x, shift, scale, packed, backend="reference"), expect, atol=1e-5, name="y")
    gate, y = torch.randn(3, 40), torch.randn_like(x)
    assert_close(nk.gated_residual(x, y, gate, packed, backend="reference"), x + gate[seg] * y, atol=1e-6, name="res")
    x_new, h = nk.residual_adaln(x, y, gate, shift, scale, packed, backend="reference")
    assert_close(x_new, x + gate[seg] * y, atol=1e-6, name="x_new")
    expect_h = F.layer_norm(x + gate[seg] * y, (40,), eps=1e-6) * (1 + scale[seg]) + shift[seg]
    assert_close(h, expect_h, atol=1e-5, name="h")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_keeps_input_dtype_and_computes_in_fp32(dtype):
    packed = PackedSeqs.from_sizes([(3, 3)])
    x = (torch.randn(9, 64) * 100 + 1000).to(dtype)  # large mean: low-precision statistics would lose it
    shift, scale = torch.zeros(2, 1, 64, dtype=dtype)
    y = nk.adaln_modulate(x, shift, scale, packed, backend="reference")
    assert y.dtype == dtype
    expect = F.layer_norm(x.float(), (64,), eps=1e-6)
    assert_close(y.float(), expect, atol=0.02, rtol=0.01, name="y")


def _meshgrid_xy_positions(h, w):
    # the official NiT get_rope: torch.meshgrid(arange(h), arange(w), indexing="xy"), stacked, flattened
    g = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="xy"), 0).reshape(2, -1)
    return g[0], g[1]


@pytest.mark.parametrize("h, w", [(1, 1), (4, 4), (3, 5), (5, 3), (1, 7), (6, 1), (7, 11)])
def test_official_positions_reproduce_official_meshgrid(h, w):
    packed = PackedSeqs.from_sizes([(2, 2), (h, w)])
    p0, p1 = packed.positions("official")
    o0, o1 = _meshgrid_xy_positions(h, w)
    assert p0[4:].tolist() == o0.tolist() and p1[4:].tolist() == o1.tolist()
    g0, g1 = packed.positions("grid")
    assert g0[4:].tolist() == [t % w for t in range(h * w)]
    assert g1[4:].tolist() == [t // w for t in range(h * w)]


def _rope_inputs(sizes, heads=3, kv_heads=1, head_dim=16, dtype=torch.float64):
    packed = PackedSeqs.from_sizes(sizes)
    q = torch.randn(packed.total_tokens, heads, head_dim, dtype=dtype)
    k = torch.randn(packed.total_tokens, kv_heads, head_dim, dtype=dtype)
    return packed, q, k, nk.rope_freqs(head_dim)


def test_rope_grid_and_official_agree_on_square_and_differ_otherwise():
    packed, q, k, f = _rope_inputs([(4, 4), (1, 1), (6, 6)])
    a = nk.rope_2d(q, k, packed, f, positions="grid", backend="reference")
    b = nk.rope_2d(q, k, packed, f, positions="official", backend="reference")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    packed, q, k, f = _rope_inputs([(3, 5)])
    a = nk.rope_2d(q, k, packed, f, positions="grid", backend="reference")
    b = nk.rope_2d(q, k, packed, f, positions="official", backend="reference")
    assert not torch.allclose(a[0], b[0])


def test_rope_matches_official_formulation():
    """The official code: q * cos + rotate_half(q) * sin with cat([freqs_h[grid0], freqs_w[grid1]]) tables."""
    h, w, dh = 3, 5, 16
    packed, q, k, f = _rope_inputs([(h, w)], head_dim=dh)
    g0, g1 = _meshgrid_xy_positions(h, w)
    f = f.double()
    ang = torch.cat([(g0[:, None] * f[0]).repeat_interleave(2, -1), (g1[:, None] * f[1]).repeat_interleave(2, -1)], -1)
    cos, sin = ang.double().cos()[:, None], ang.double().sin()[:, None]

    def rotate_half(x):  # interleaved pairs (x0, x1) -> (-x1, x0)
        x = x.unflatten(-1, (-1, 2))
        return torch.stack([-x[..., 1], x[..., 0]], -1).flatten(-2)

    qr, kr = nk.rope_2d(q, k, packed, f, positions="official", backend="reference")
    assert_close(qr, q * cos + rotate_half(q) * sin, atol=1e-12, name="q")
    assert_close(kr, k * cos + rotate_half(k) * sin, atol=1e-12, name="k")


def test_rope_preserves_norms_and_scales_by_mscale():
    packed, q, k, f = _rope_inputs([(3, 7), (2, 2)])
    qr, kr = nk.rope_2d(q, k, packed, f, mscale=1.5, backend="reference")
    assert_close(qr.norm(dim=-1), 1.5 * q.norm(dim=-1), atol=1e-10, name="|q|")
    assert_close(kr.norm(dim=-1), 1.5 * k.norm(dim=-1), atol=1e-10, name="|k|")


def test_rope_gradient_is_the_inverse_rotation():
    packed, q, k, f = _rope_inputs([(3, 5), (1, 1), (4, 1)])
    q.requires_grad_(), k.requires_grad_()
    qr, kr = nk.rope_2d(q, k, packed, f, mscale=1.3, backend="reference")
    gq, gk = torch.randn_like(qr), torch.randn_like(kr)
    dq, dk = torch.autograd.grad((qr, kr), (q, k), (gq, gk))
    # the transpose of a rotation by angle a is the rotation by -a: negated frequencies
    inv_q, inv_k = nk.rope_2d(gq, gk, packed, -f, mscale=1.3, backend="reference")
    assert_close(dq, inv_q, atol=1e-12, name="dq")
    assert_close(dk, inv_k, atol=1e-12, name="dk")


def test_qk_norm_rope_is_layer_norm_then_rope():
    packed, q, k, f = _rope_inputs([(3, 5), (2, 2)], head_dim=8)
    w, b = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    qn = F.layer_norm(q, (8,), w, b, eps=1e-5)
    kn = F.layer_norm(k, (8,), w * 2, b - 1, eps=1e-5)
    expect = nk.rope_2d(qn, kn, packed, f, backend="reference")
    got = nk.qk_norm_rope(q, k, packed, f, q_weight=w, q_bias=b, k_weight=w * 2, k_bias=b - 1, backend="reference")
    assert_close(got[0], expect[0], atol=1e-12, name="q")
    assert_close(got[1], expect[1], atol=1e-12, name="k")


def _sdpa_per_image(q, k, v, cu_q, cu_k, causal=False):
    outs = []
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for i in range(len(cq) - 1):
        qi, ki, vi = (t.transpose(0, 1) for t in (q[cq[i]:cq[i + 1]], k[ck[i]:ck[i + 1]], v[ck[i]:ck[i + 1]]))
        outs.append(F.scaled_dot_product_attention(qi, ki, vi, is_causal=causal).transpose(0, 1))
    return torch.cat(outs)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", [64, 72])
def test_varlen_attention_equals_sdpa_per_image(causal, head_dim):
    packed = PackedSeqs.from_sizes([(1, 1), (3, 5), (7, 1), (4, 4)])
    q, k, v = torch.randn(3, packed.total_tokens, 4, head_dim).unbind(0)
    cu, m = packed.cu_seqlens, packed.max_seqlen
    out = nk.varlen_attention(q, k, v, cu, cu, m, m, causal=causal, backend="reference")
    assert_close(out, _sdpa_per_image(q, k, v, cu, cu, causal), atol=1e-5, name="out")


def test_varlen_attention_grouped_query_heads():
    packed = PackedSeqs.from_sizes([(3, 5), (2, 2)])
    q = torch.randn(packed.total_tokens, 6, 16)
    k, v = torch.randn(2, packed.total_tokens, 2, 16).unbind(0)
    cu, m = packed.cu_seqlens, packed.max_seqlen
    out = nk.varlen_attention(q, k, v, cu, cu, m, m, backend="reference")
    expect = _sdpa_per_image(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), cu, cu)
    assert_close(out, expect, atol=1e-5, name="out")


def test_varlen_attention_causal_cross_lengths_align_bottom_right():
    cu_q = torch.tensor([0, 2, 5], dtype=torch.int32)
    cu_k = torch.tensor([0, 4, 6], dtype=torch.int32)  # image 0: 2 queries, 4 keys; image 1: 3 queries, 2 keys
    q, k, v = torch.randn(5, 2, 8), torch.randn(6, 2, 8), torch.randn(6, 2, 8)
    out = nk.varlen_attention(q, k, v, cu_q, cu_k, 3, 4, causal=True, backend="reference")
    # image 0: query i sees keys j <= i + 2
    mask0 = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    exp0 = F.scaled_dot_product_attention(q[:2].transpose(0, 1), k[:4].transpose(0, 1), v[:4].transpose(0, 1),
                                          attn_mask=mask0).transpose(0, 1)
    assert_close(out[:2], exp0, atol=1e-5, name="image 0")
    # image 1: query 0 sees no key (j <= 0 - 1) and outputs 0; query i>0 sees j <= i - 1
    assert torch.equal(out[2], torch.zeros_like(out[2]))
    mask1 = torch.tensor([[1, 0], [1, 1]], dtype=torch.bool)
    exp1 = F.scaled_dot_product_attention(q[3:].transpose(0, 1), k[4:].transpose(0, 1), v[4:].transpose(0, 1),
                                          attn_mask=mask1).transpose(0, 1)
    assert_close(out[3:], exp1, atol=1e-5, name="image 1")


def test_varlen_attention_softmax_scale():
    packed = PackedSeqs.from_sizes([(2, 3)])
    q, k, v = torch.randn(3, 6, 2, 8).unbind(0)
    cu = packed.cu_seqlens
    a = nk.varlen_attention(q, k, v, cu, cu, 6, 6, softmax_scale=0.5, backend="reference")
    b = nk.varlen_attention(q * (0.5 * math.sqrt(8)), k, v, cu, cu, 6, 6, backend="reference")
    assert_close(a, b, atol=1e-6, name="out")


@pytest.mark.parametrize("op", OPS)
def test_gradcheck_float64(op):
    packed = PackedSeqs.from_sizes([(1, 1), (2, 3), (3, 1)])
    shape = {"head_dim": 8, "heads": 2} if op in ("rope_2d", "qk_norm_rope", "varlen_attention") else {"dim": 6}
    inp = cast_inputs(op, op_inputs(op, packed, **shape), torch.float64, torch.float64)
    names = [k for k, v in inp.items() if v.requires_grad]
    kws = [{}] if op != "varlen_attention" else [{}, {"causal": True}]
    if op in ("rope_2d", "qk_norm_rope"):
        kws = [{"positions": "grid", "mscale": 1.2}, {"positions": "official"}]

    for kw in kws:
        def f(*args):
            d = dict(inp)
            d.update(zip(names, args))
            return call_op(op, packed, d, "reference", **kw)

        assert torch.autograd.gradcheck(f, tuple(inp[k] for k in names), eps=1e-6, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------
def test_bad_input_errors_are_clear():
    packed = PackedSeqs.from_sizes([(2, 3), (1, 1)])
    x = torch.randn(7, 16)
    sh, sc = torch.randn(2, 2, 16)
    with pytest.raises(ValueError, match="8 rows but the pack holds 7 tokens"):
        nk.adaln_modulate(torch.randn(8, 16), sh, sc, packed)
    with pytest.raises(ValueError, match=r"shift must have shape \(2, 16\)"):
        nk.adaln_modulate(x, torch.randn(3, 16), sc, packed)
    with pytest.raises(ValueError, match="PackedSeqs"):
        nk.adaln_modulate(x, sh, sc, packed.cu_seqlens)
    with pytest.raises(ValueError, match="floating-point"):
        nk.adaln_modulate(x.long(), sh, sc, packed)
    with pytest.raises(ValueError, match="dtype torch.float16 but x has torch.float32"):
        nk.adaln_modulate(x, sh.half(), sc, packed)
    with pytest.raises(ValueError, match="is on meta"):
        nk.adaln_modulate(x.to("meta"), sh, sc, packed)
    with pytest.raises(ValueError, match="scale is on meta"):
        nk.adaln_modulate(x, sh, sc.to("meta"), packed)
    q = torch.randn(7, 2, 6)
    with pytest.raises(ValueError, match="multiple of 4"):
        nk.rope_2d(q, q, packed, torch.randn(2, 1))
    q = torch.randn(7, 2, 8)
    with pytest.raises(ValueError, match=r"freqs must have shape \(2, 2\)"):
        nk.rope_2d(q, q, packed, torch.randn(2, 3))
    with pytest.raises(ValueError, match="positions must be"):
        nk.rope_2d(q, q, packed, nk.rope_freqs(8), positions="xy")
    with pytest.raises(ValueError, match="q_weight must have shape"):
        nk.qk_norm_rope(q, q, packed, nk.rope_freqs(8), q_weight=torch.ones(4), q_bias=torch.zeros(8),
                        k_weight=torch.ones(8), k_bias=torch.zeros(8))


def test_bad_attention_input_errors_are_clear():
    q = torch.randn(7, 2, 8)
    cu = torch.tensor([0, 6, 7], dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seqlens_q must be int32"):
        nk.varlen_attention(q, q, q, cu.long(), cu, 6, 6)
    with pytest.raises(ValueError, match="1-D"):
        nk.varlen_attention(q, q, q, cu[None], cu, 6, 6)
    with pytest.raises(ValueError, match=r"cu_seqlens_q\[-1\]=6 must equal the number of tokens 7"):
        nk.varlen_attention(q, q, q, torch.tensor([0, 3, 6], dtype=torch.int32), cu, 6, 6)
    with pytest.raises(ValueError, match="non-decreasing"):
        nk.varlen_attention(q, q, q, torch.tensor([0, 7, 6, 7], dtype=torch.int32),
                            torch.tensor([0, 6, 6, 7], dtype=torch.int32), 7, 7)
    with pytest.raises(ValueError, match="smaller than the longest sequence"):
        nk.varlen_attention(q, q, q, cu, cu, 5, 6)
    with pytest.raises(ValueError, match="Python int"):
        nk.varlen_attention(q, q, q, cu, cu, torch.tensor(6), 6)
    with pytest.raises(ValueError, match="multiple of k/v heads"):
        nk.varlen_attention(torch.randn(7, 3, 8), q, q, cu, cu, 6, 6)
    with pytest.raises(ValueError, match="same number of sequences"):
        nk.varlen_attention(q, q, q, cu, torch.tensor([0, 7], dtype=torch.int32), 6, 7)
    with pytest.raises(ValueError, match="is on meta"):
        nk.varlen_attention(q, q.to("meta"), q, cu, cu, 6, 6)


# ---------------------------------------------------------------------------------------------
# properties over random packs
# ---------------------------------------------------------------------------------------------
sizes_strategy = st.lists(st.tuples(st.integers(1, 9), st.integers(1, 9)), min_size=1, max_size=8)


@settings(max_examples=40, deadline=None)
@given(sizes=sizes_strategy, seed=st.integers(0, 2**16))
def test_property_adaln_rows_are_normalised_per_image(sizes, seed):
    packed = PackedSeqs.from_sizes(sizes)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(packed.total_tokens, 12, generator=g, dtype=torch.float64) * 3 + 1
    zeros = torch.zeros(packed.num_seqs, 12, dtype=torch.float64)
    y = nk.adaln_modulate(x, zeros, zeros, packed)
    # shift = scale = 0: every row has mean 0 and (almost) unit variance
    assert_close(y.mean(-1), torch.zeros(packed.total_tokens, dtype=torch.float64), atol=1e-9, name="mean")
    var = y.var(-1, unbiased=False)
    assert bool((var <= 1 + 1e-9).all())
    # shift = 1 moves exactly the rows of its image
    shift = torch.zeros_like(zeros)
    i = seed % packed.num_seqs
    shift[i] = 1
    y2 = nk.adaln_modulate(x, shift, zeros, packed)
    moved = (y2 - y).abs().amax(-1) > 0.5
    assert moved.nonzero().flatten().tolist() == list(range(packed.cu_seqlens[i].item(), packed.cu_seqlens[i + 1].item()))


@settings(max_examples=40, deadline=None)
@given(sizes=sizes_strategy, positions=st.sampled_from(["grid", "official"]))
def test_property_rope_positions_cover_each_image_once(sizes, positions):
    packed = PackedSeqs.from_sizes(sizes)
    p0, p1 = packed.positions(positions)
    for i, (h, w) in enumerate(packed.size_list):
        a, b = packed.cu_seqlens[i].item(), packed.cu_seqlens[i + 1].item()
        m = w if positions == "grid" else h
        pairs = set(zip(p0[a:b].tolist(), p1[a:b].tolist()))
        assert len(pairs) == h * w
        assert all(0 <= x < m and 0 <= y < h * w // m for x, y in pairs)


@settings(max_examples=25, deadline=None)
@given(sizes=sizes_strategy, causal=st.booleans(), seed=st.integers(0, 2**16))
def test_property_attention_equals_sdpa(sizes, causal, seed):
    packed = PackedSeqs.from_sizes(sizes)
    g = torch.Generator().manual_seed(seed)
    q, k, v = torch.randn(3, packed.total_tokens, 2, 8, generator=g, dtype=torch.float64).unbind(0)
    cu, m = packed.cu_seqlens, packed.max_seqlen
    out = nk.varlen_attention(q, k, v, cu, cu, m, m, causal=causal)
    assert_close(out, _sdpa_per_image(q, k, v, cu, cu, causal), atol=1e-10, name="out")


def test_compile_fullgraph_chain_of_reference_ops():
    packed = PackedSeqs.from_sizes([(3, 4), (1, 1), (2, 5)])
    n, d, hd = packed.total_tokens, 16, 8
    f = nk.rope_freqs(hd)
    w, b = torch.ones(hd), torch.zeros(hd)

    def block(x, y, gate, shift, scale, qkv):
        h = nk.adaln_modulate(x, shift, scale, packed, backend="reference")
        x2, h2 = nk.residual_adaln(x, y * h, gate, shift, scale, packed, backend="reference")
        q, k, v = qkv.unbind(1)
        q, k = nk.qk_norm_rope(q, k, packed, f, q_weight=w, q_bias=b, k_weight=w, k_bias=b, backend="reference")
        q, k = nk.rope_2d(q, k, packed, f, positions="official", backend="reference")
        o = nk.varlen_attention(q, k, v, packed.cu_seqlens, packed.cu_seqlens, packed.max_seqlen,
                                packed.max_seqlen, backend="reference")
        return nk.gated_residual(x2, h2 + o.flatten(1), gate, packed, backend="reference")

    args = [torch.randn(n, d), torch.randn(n, d), torch.randn(3, d), torch.randn(3, d), torch.randn(3, d),
            torch.randn(n, 3, 2, hd)]
    args = [a.requires_grad_() for a in args]
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True)
    out_c = compiled(*args)
    out_e = block(*args)
    assert_close(out_c, out_e, atol=1e-5, name="compiled vs eager")
    g_c = torch.autograd.grad(out_c.square().sum(), args)
    g_e = torch.autograd.grad(out_e.square().sum(), args)
    for i, (a, e) in enumerate(zip(g_c, g_e)):
        assert_close(a, e, atol=1e-4, rtol=1e-4, name=f"grad {i}")


@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_attention_grouped_heads_and_cross_lengths(causal):
    cu_q = torch.tensor([0, 2, 5, 5, 6], dtype=torch.int32)  # includes an empty image and sq != sk
    cu_k = torch.tensor([0, 4, 6, 7, 8], dtype=torch.int32)
    q = torch.randn(6, 4, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(8, 2, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(8, 2, 8, dtype=torch.float64, requires_grad=True)

    def f(q, k, v):
        return nk.varlen_attention(q, k, v, cu_q, cu_k, 3, 4, causal=causal, backend="reference")

    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-5)
