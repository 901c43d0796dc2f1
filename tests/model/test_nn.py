"""nit_kernels.nn drop-in modules against explicit per-image PyTorch code."""
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F

import nit_kernels as nk
from nit_kernels.nn import (AxialRoPE2D, GatedResidual, PackedAdaLN, ResidualAdaLN, VarlenSelfAttention,
                            rebuild_in_backward)
from nit_kernels.testing import assert_close

SIZES = [(3, 5), (1, 1), (4, 2), (2, 2)]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/model/conftest.py


def _rotate_pairs(x, cos, sin):
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1).flatten(-2)


def explicit_rope(q, h, w, freqs, positions, mscale=1.0):
    """q [h*w, H, Dh] of one image, rotated with positions computed from (h, w)."""
    t = torch.arange(h * w)
    m = w if positions == "grid" else h
    p0, p1 = (t % m).float(), (t // m).float()
    ang = torch.cat([p0[:, None] * freqs[0], p1[:, None] * freqs[1]], dim=-1)[:, None, :]
    return _rotate_pairs(q, ang.cos() * mscale, ang.sin() * mscale)


def explicit_attention(mod, x, sizes):
    outs, start = [], 0
    hd = mod.head_dim
    for h, w in sizes:
        n = h * w
        q, k, v = mod.qkv(x[start:start + n]).view(n, 3, mod.num_heads, hd).unbind(1)
        start += n
        if mod.qk_norm:
            q = F.layer_norm(q, (hd,), mod.q_norm.weight, mod.q_norm.bias, 1e-5)
            k = F.layer_norm(k, (hd,), mod.k_norm.weight, mod.k_norm.bias, 1e-5)
        if mod.rope is not None:
            r = mod.rope
            q, k = (explicit_rope(a, h, w, r.freqs, r.positions, r.mscale) for a in (q, k))
        o = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)).transpose(0, 1)
        outs.append(mod.proj(o.reshape(n, -1)))
    return torch.cat(outs)


@pytest.mark.parametrize("positions", ["grid", "official"])
def test_axial_rope_module(positions):
    packed = nk.PackedSeqs.from_sizes(SIZES)
    rope = AxialRoPE2D(16, theta=100.0, positions=positions, mscale=1.3)
    q, k = torch.randn(packed.total_tokens, 3, 16), torch.randn(packed.total_tokens, 1, 16)
    qr, kr = rope(q, k, packed)
    ref_q = torch.cat([explicit_rope(a, h, w, rope.freqs, positions, 1.3) for a, (h, w) in zip(packed.split(q), SIZES)])
    ref_k = torch.cat([explicit_rope(a, h, w, rope.freqs, positions, 1.3) for a, (h, w) in zip(packed.split(k), SIZES)])
    assert_close(qr, ref_q, atol=1e-5, name="q")
    assert_close(kr, ref_k, atol=1e-5, name="k")
    assert torch.equal(rope.freqs, nk.rope_freqs(16, theta=100.0))
    assert rope.state_dict() == {}  # nothing to load: the table is rebuilt from the config


def test_rope_table_stays_fp32_when_the_module_is_cast():
    rope = AxialRoPE2D(8)
    ref = rope.freqs.clone()
    rope.half()
    assert rope.freqs.dtype == torch.float32 and torch.equal(rope.freqs, ref)
    rope.to(torch.float64)
    assert rope.freqs.dtype == torch.float32
    with pytest.raises(ValueError, match=r"freqs must have shape \(2, 2\)"):
        AxialRoPE2D(8, freqs=torch.ones(2, 3))
    with pytest.raises(ValueError, match="positions must be 'grid' or 'official'"):
        AxialRoPE2D(8, positions="xy")


@pytest.mark.parametrize("qk_norm,use_rope", [(True, True), (True, False), (False, True), (False, False)])
def test_varlen_self_attention_matches_per_image_attention(qk_norm, use_rope):
    torch.manual_seed(0)
    packed = nk.PackedSeqs.from_sizes(SIZES)
    rope = AxialRoPE2D(12, positions="grid") if use_rope else None
    mod = VarlenSelfAttention(48, 4, qk_norm=qk_norm, rope=rope)
    if qk_norm:
        with torch.no_grad():
            mod.q_norm.weight.normal_(1, 0.2), mod.k_norm.bias.normal_(0, 0.2)
    x = torch.randn(packed.total_tokens, 48, requires_grad=True)
    out = mod(x, packed)
    ref = explicit_attention(mod, x, SIZES)
    assert_close(out, ref, atol=1e-5, rtol=1e-5, name="out")
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, mod.qkv.weight], g)
    want = torch.autograd.grad(ref, [x, mod.qkv.weight], g)
    for name, a, b in zip(("dx", "dqkv"), got, want):
        assert_close(a, b, atol=1e-4, rtol=1e-4, name=name)
    assert {n for n, _ in mod.named_parameters()} >= {"qkv.weight", "proj.weight"}


@pytest.mark.parametrize("qk_norm,use_rope", [(True, True), (False, True), (True, False)])
def test_selective_recompute_keeps_values_and_gradients(qk_norm, use_rope):
    torch.manual_seed(0)
    packed = nk.PackedSeqs.from_sizes(SIZES)
    rope = AxialRoPE2D(12, positions="official") if use_rope else None
    plain = VarlenSelfAttention(48, 4, qk_norm=qk_norm, rope=rope)
    lean = VarlenSelfAttention(48, 4, qk_norm=qk_norm, rope=rope, selective_recompute=True)
    lean.load_state_dict(plain.state_dict())
    x = torch.randn(packed.total_tokens, 48, requires_grad=True)
    g = torch.randn(packed.total_tokens, 48)
    outs, grads = [], []
    for m in (plain, lean):
        out = m(x, packed)
        outs.append(out)
        grads.append(torch.autograd.grad(out, [x, *m.parameters()], g))
    assert torch.equal(outs[0], outs[1])
    for a, b in zip(*grads):
        assert_close(b, a, atol=1e-6, rtol=1e-6)


def test_rebuild_in_backward_drops_the_target_and_rebuilds_it():
    a = torch.randn(50, requires_grad=True)
    base = torch.randn(50)
    calls = []

    def rebuild():
        calls.append(1)
        return (base.exp(),)

    b = base.exp()
    ref = weakref.ref(b)
    with rebuild_in_backward((b,), rebuild):
        y = (a * b).sum()
    del b
    gc.collect()
    assert ref() is None  # the graph did not keep it
    (ga,) = torch.autograd.grad(y, [a])
    assert torch.equal(ga, base.exp()) and calls == [1]


def test_varlen_self_attention_rejects_a_mismatched_rope():
    with pytest.raises(ValueError, match="rope was built for head_dim 8, attention has head_dim 12"):
        VarlenSelfAttention(48, 4, rope=AxialRoPE2D(8))


def test_parameter_free_modules_equal_the_functional_ops():
    packed = nk.PackedSeqs.from_sizes(SIZES)
    n, b, d = packed.total_tokens, packed.num_seqs, 24
    x, y = torch.randn(n, d), torch.randn(n, d)
    gate, shift, scale = torch.randn(3, b, d)
    seg = packed.seg_ids.long()
    ln = F.layer_norm(x, (d,), eps=1e-6)
    assert_close(PackedAdaLN()(x, shift, scale, packed), ln * (1 + scale[seg]) + shift[seg], atol=1e-5)
    assert_close(GatedResidual()(x, y, gate, packed), x + gate[seg] * y, atol=1e-6)
    x_new, h = ResidualAdaLN()(x, y, gate, shift, scale, packed)
    assert_close(x_new, x + gate[seg] * y, atol=1e-6)
    assert_close(h, F.layer_norm(x_new, (d,), eps=1e-6) * (1 + scale[seg]) + shift[seg], atol=1e-5)
    for m in (PackedAdaLN(), GatedResidual(), ResidualAdaLN()):
        assert list(m.parameters()) == []
    with pytest.raises(ValueError, match=r"shift must have shape"):
        PackedAdaLN()(x, shift[:1], scale, packed)
