"""Pure-PyTorch reference of every op: the spec, the test oracle and the last fallback.

Each function takes the packing metadata as tensors (``cu_seqlens`` int32 [B+1], ``sizes`` int32
[B, 2]) exactly like the kernels of the other backends, computes in fp32 (fp64 stays fp64), and
returns the input dtype. The element-wise ops are traceable by ``torch.compile`` as they stand;
``varlen_attention`` loops over images on the host, so it is wrapped in a ``torch.library``
custom op (``nit_ref::varlen_attention_fwd``, with the contract of every backend:
nit_kernels/_autograd.py) that ``torch.compile`` keeps whole in the graph; its backward has a
backward of its own, so second derivatives work here (and only here).
"""
from __future__ import annotations

import torch

from .. import _autograd
from ..packed import segment_ids, token_positions

NAMESPACE = "nit_ref"

__all__ = [
    "adaln_modulate",
    "gated_residual",
    "residual_adaln",
    "rope_2d",
    "qk_norm_rope",
    "varlen_attention",
    "bias_gelu",
    "bias_gelu_bwd",
    "attention_math",
    "attention_math_backward",
]


def _ct(t: torch.Tensor) -> torch.dtype:
    """Compute dtype: fp32 for fp16/bf16/fp32 inputs, fp64 for fp64."""
    return torch.promote_types(t.dtype, torch.float32)


def _layer_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the last dim, biased variance."""
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).square().mean(-1, keepdim=True)
    return (x - mean) * torch.rsqrt(var + eps)


def adaln_modulate(x, shift, scale, cu_seqlens, eps: float = 1e-6):
    """y = LN(x) * (1 + scale[seg]) + shift[seg];  x [N, D], shift/scale [B, D]."""
    ct = _ct(x)
    seg = segment_ids(cu_seqlens, x.shape[0])
    y = _layer_norm(x.to(ct), eps) * (1 + scale.to(ct)[seg]) + shift.to(ct)[seg]
    return y.to(x.dtype)


def gated_residual(x, y, gate, cu_seqlens):
    """out = x + gate[seg] * y;  x, y [N, D], gate [B, D]."""
    ct = _ct(x)
    seg = segment_ids(cu_seqlens, x.shape[0])
    return (x.to(ct) + gate.to(ct)[seg] * y.to(ct)).to(x.dtype)


def residual_adaln(x, y, gate, shift, scale, cu_seqlens, eps: float = 1e-6):
    """x_new = x + gate[seg] * y;  h = LN(x_new) * (1 + scale[seg]) + shift[seg].

    h is computed from the fp32 x_new (before rounding to the input dtype), as a fused kernel does.
    """
    ct = _ct(x)
    seg = segment_ids(cu_seqlens, x.shape[0])
    x_new = x.to(ct) + gate.to(ct)[seg] * y.to(ct)
    h = _layer_norm(x_new, eps) * (1 + scale.to(ct)[seg]) + shift.to(ct)[seg]
    return x_new.to(x.dtype), h.to(x.dtype)


def _rope_cos_sin(cu_seqlens, sizes, freqs, n, positions, mscale, ct):
    """cos and sin [N, 1, Dh/2] (times mscale) of the angle of every interleaved pair."""
    p0, p1 = token_positions(cu_seqlens, sizes, n, positions)
    f = freqs.to(ct)
    # first Dh/4 pairs rotate with axis-0 position and freqs[0], the rest with axis 1 and freqs[1]
    angle = torch.cat([p0.to(ct)[:, None] * f[0], p1.to(ct)[:, None] * f[1]], dim=-1)
    return (angle.cos() * mscale)[:, None, :], (angle.sin() * mscale)[:, None, :]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """(x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin) on interleaved pairs (2i, 2i+1) of the last dim."""
    x0, x1 = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1).flatten(-2)


def rope_2d(q, k, cu_seqlens, sizes, freqs, positions: str = "grid", mscale: float = 1.0):
    """Axial 2D RoPE of q [N, H, Dh] and k [N, Hk, Dh] with freqs [2, Dh/4] (docs/ARCHITECTURE.md, "The ops")."""
    ct = _ct(q)
    cos, sin = _rope_cos_sin(cu_seqlens, sizes, freqs, q.shape[0], positions, mscale, ct)
    return _rotate(q.to(ct), cos, sin).to(q.dtype), _rotate(k.to(ct), cos, sin).to(k.dtype)


def qk_norm_rope(q, k, cu_seqlens, sizes, freqs, q_weight, q_bias, k_weight, k_bias,
                 eps: float = 1e-5, positions: str = "grid", mscale: float = 1.0):
    """LayerNorm over Dh with affine (weight, bias [Dh]) of q and k, then rope_2d."""
    ct = _ct(q)
    cos, sin = _rope_cos_sin(cu_seqlens, sizes, freqs, q.shape[0], positions, mscale, ct)
    qn = _layer_norm(q.to(ct), eps) * q_weight.to(ct) + q_bias.to(ct)
    kn = _layer_norm(k.to(ct), eps) * k_weight.to(ct) + k_bias.to(ct)
    return _rotate(qn, cos, sin).to(q.dtype), _rotate(kn, cos, sin).to(k.dtype)


def _images(cu_seqlens_q, cu_seqlens_k):
    """(q0, q1, k0, k1) row ranges of every image with at least one query and one key."""
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for i in range(len(cq) - 1):
        if cq[i + 1] > cq[i] and ck[i + 1] > ck[i]:
            yield cq[i], cq[i + 1], ck[i], ck[i + 1]


def _scores(qi, ki, softmax_scale, causal):
    """(scale * qi ki^T [H, sq, sk], with -inf where the causal mask hides a key; the mask or None)."""
    s = (qi @ ki.transpose(-1, -2)) * softmax_scale
    if not causal:
        return s, None
    sq, sk = qi.shape[1], ki.shape[1]
    rows = torch.arange(sq, device=qi.device)[:, None]
    cols = torch.arange(sk, device=qi.device)[None, :]
    allowed = cols <= rows + (sk - sq)
    return s.masked_fill(~allowed, float("-inf")), allowed


def _softmax(s, allowed):
    """softmax over keys; causal rows that see no key are all zero."""
    p = torch.softmax(s, dim=-1)
    return p if allowed is None else p.masked_fill(~allowed.any(-1, keepdim=True), 0.0)


def _probs(qi, ki, softmax_scale, causal):
    """softmax(qi ki^T * scale) [H, sq, sk]; causal rows that see no key are all zero."""
    return _softmax(*_scores(qi, ki, softmax_scale, causal))


def _heads(t, ct, group):
    """[s, Hk, D] rows -> [H, s, D] in the compute dtype, k/v heads repeated for grouped queries."""
    return t.to(ct).transpose(0, 1).repeat_interleave(group, dim=0)


def attention_math(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale: float, causal: bool):
    """softmax(q k^T * scale) v per image, explicit math in the compute dtype; host loop over images.

    q [Nq, H, D], k [Nk, Hk, D], v [Nk, Hk, Dv], H a multiple of Hk (grouped-query heads).
    causal: query i of an image with sq queries and sk keys sees keys j <= i + sk - sq
    (bottom-right aligned, as flash-attn >= 2.1); a query that sees no key outputs 0.
    """
    return _attention(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal)[0]


def _attention(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal):
    """(out [Nq, H, Dv] in q's dtype, lse [H, Nq] fp32): lse is the natural log of each query's
    softmax normaliser, -inf for a query that sees no key (the statistic every backend saves)."""
    ct, group = _ct(q), q.shape[1] // k.shape[1]
    out = q.new_zeros(q.shape[0], q.shape[1], v.shape[-1], dtype=ct)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=ct, device=q.device)
    for q0, q1, k0, k1 in _images(cu_seqlens_q, cu_seqlens_k):
        s, allowed = _scores(_heads(q[q0:q1], ct, 1), _heads(k[k0:k1], ct, group), softmax_scale, causal)
        lse[:, q0:q1] = torch.logsumexp(s, dim=-1)
        out[q0:q1] = (_softmax(s, allowed) @ _heads(v[k0:k1], ct, group)).transpose(0, 1)
    return out.to(q.dtype), lse.float()


def attention_math_backward(dout, q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale: float, causal: bool):
    """Gradients of attention_math: with P = softmax(S), S = scale * q k^T, O = P v per image,
    dv = P^T dO, dP = dO v^T, dS = P * (dP - rowsum(dP * P)), dq = scale dS k, dk = scale dS^T q
    (summed over the query heads that share a k/v head)."""
    ct, hk = _ct(q), k.shape[1]
    group = q.shape[1] // hk
    dq = torch.zeros(q.shape, dtype=ct, device=q.device)
    dk = torch.zeros(k.shape, dtype=ct, device=q.device)
    dv = torch.zeros(v.shape, dtype=ct, device=q.device)
    for q0, q1, k0, k1 in _images(cu_seqlens_q, cu_seqlens_k):
        qi, ki, vi = _heads(q[q0:q1], ct, 1), _heads(k[k0:k1], ct, group), _heads(v[k0:k1], ct, group)
        do = _heads(dout[q0:q1], ct, 1)
        p = _probs(qi, ki, softmax_scale, causal)
        dp = do @ vi.transpose(-1, -2)
        ds = p * (dp - (dp * p).sum(-1, keepdim=True))
        dq[q0:q1] = ((ds @ ki) * softmax_scale).transpose(0, 1)
        fold = lambda t: t.unflatten(0, (hk, group)).sum(1).transpose(0, 1)  # noqa: E731
        dk[k0:k1] = fold((ds.transpose(-1, -2) @ qi) * softmax_scale)
        dv[k0:k1] = fold(p.transpose(-1, -2) @ do)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# The raw functions of the op contract (nit_kernels/_autograd.py); the backward recomputes the
# probabilities from q and k (out and lse are accepted for the common argument list).
def _attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal):
    return _attention(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal)


def _attention_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                   causal):
    return attention_math_backward(dout, q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal)


_varlen_attention_op = _autograd.define(NAMESPACE, "varlen_attention_fwd", _attention_fwd)
_autograd.define(NAMESPACE, "varlen_attention_bwd", _attention_bwd)


def _attn_bwd_setup(ctx, inputs, output):
    dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, causal = inputs
    ctx.save_for_backward(dout, q, k, v, cu_q, cu_k)
    ctx.scale, ctx.causal = scale, causal


def _attn_double_backward(ctx, ddq, ddk, ddv):
    """Second derivatives: autograd through the explicit math of attention_math_backward."""
    dout, q, k, v, cu_q, cu_k = ctx.saved_tensors
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in (dout, q, k, v)]
        grads = attention_math_backward(*leaves, cu_q, cu_k, ctx.scale, ctx.causal)
        gos = [torch.zeros_like(g) if gg is None else gg for g, gg in zip(grads, (ddq, ddk, ddv))]
        d = torch.autograd.grad(grads, leaves, gos, allow_unused=True)
    # out and lse feed no gradient: the math above recomputes them from q, k and v
    return tuple(torch.zeros_like(t) if g is None else g for t, g in zip(leaves, d)) + (None,) * 8


_autograd.register_fake_and_autograd(NAMESPACE, "varlen_attention", "reference",
                                     second_derivative=(_attn_double_backward, _attn_bwd_setup))


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
                     softmax_scale: float, causal: bool = False):
    """Attention inside each image only (flash_attn_varlen_func semantics); out [Nq, H, Dv]."""
    return _varlen_attention_op(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                float(softmax_scale), bool(causal))[0]


def bias_gelu(x, bias):
    """y = gelu_tanh(x + bias) = 0.5 z (1 + tanh(sqrt(2/pi) (z + 0.044715 z^3))), z = x + bias;
    x [N, H], bias [H] (any float dtype); fp32 math, y in x's dtype."""
    ct = _ct(x)
    return torch.nn.functional.gelu(x.to(ct) + bias.to(ct), approximate="tanh").to(x.dtype)


def bias_gelu_bwd(dy, x, bias):
    """(dx, dbias, y) of bias_gelu: dx = dy * gelu_tanh'(z), dbias = sum over rows of dx (fp32
    sums, in bias's dtype), y = bias_gelu(x, bias) recomputed."""
    ct = _ct(x)
    z = x.to(ct) + bias.to(ct)
    dz = torch.ops.aten.gelu_backward(dy.to(ct), z, approximate="tanh")
    y = torch.nn.functional.gelu(z, approximate="tanh")
    return dz.to(x.dtype), dz.sum(0).to(bias.dtype), y.to(x.dtype)


# the backend interface of nit_kernels/dispatch.py: every op, every call
OPS = {op: globals()[op] for op in
       ("adaln_modulate", "gated_residual", "residual_adaln", "rope_2d", "qk_norm_rope", "varlen_attention",
        "bias_gelu")}


def load_error():
    return None


def refuse(call):
    return None
