"""The public functional API: validate the call, pick a backend (dispatch.py), run it.

Every function accepts ``backend=None`` (automatic), or one of "reference", "cpu", "cuda",
"triton" (and "flash_attn" for attention). Inputs may be float32, float16 or bfloat16 (float64
runs on the reference backend); math is fp32 and outputs keep the input dtype. All are
differentiable and traceable by ``torch.compile(fullgraph=True)``.
"""
from __future__ import annotations

import math
import operator
from typing import Optional

import torch

from . import dispatch
from .packed import POSITIONS, PackedSeqs, validate_cu_seqlens

__all__ = ["adaln_modulate", "gated_residual", "residual_adaln", "rope_2d", "qk_norm_rope", "varlen_attention",
           "bias_gelu", "bias_gelu_backward"]


def _fail(op: str, msg: str):
    raise ValueError(f"{op}: {msg}")


def _check_packed(op: str, packed) -> PackedSeqs:
    if not isinstance(packed, PackedSeqs):
        _fail(op, f"packed must be a PackedSeqs (build one with PackedSeqs.from_sizes([(h, w), ...])), "
                  f"got {type(packed).__name__}")
    # a pack changed in place or assembled without its constructor is checked again (CPU packs:
    # no device sync; a pack unchanged since its last check costs a few attribute reads)
    cu = getattr(packed, "cu_seqlens", None)
    if not torch.compiler.is_compiling() and not (isinstance(cu, torch.Tensor) and cu.device.type != "cpu"):
        try:
            packed.validate()
        except ValueError as e:
            _fail(op, str(e))
    return packed


def _check_tensor(op: str, t, name: str, ndim: int, shape_doc: str):
    if not isinstance(t, torch.Tensor):
        _fail(op, f"{name} must be a tensor {shape_doc}, got {type(t).__name__}")
    if not t.is_floating_point():
        _fail(op, f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if t.dim() != ndim:
        _fail(op, f"{name} must be {shape_doc}, got shape {tuple(t.shape)}")


def _check_tokens(op: str, t, name: str, packed: PackedSeqs, ndim: int, shape_doc: str):
    _check_tensor(op, t, name, ndim, shape_doc)
    if t.shape[0] != packed.total_tokens:
        _fail(op, f"{name} has {t.shape[0]} rows but the pack holds {packed.total_tokens} tokens "
                  f"(sizes sum of h*w over {packed.num_seqs} images)")
    if t.device != packed.device:
        _fail(op, f"{name} is on {t.device} but the pack's cu_seqlens is on {packed.device} (use packed.to(device))")


def _check_like(op: str, t, name: str, ref: torch.Tensor, ref_name: str, shape: tuple, shape_doc: str):
    _check_tensor(op, t, name, len(shape), shape_doc)
    if tuple(t.shape) != tuple(shape):
        _fail(op, f"{name} must have shape {tuple(shape)} {shape_doc}, got {tuple(t.shape)}")
    if t.device != ref.device:
        _fail(op, f"{name} is on {t.device} but {ref_name} is on {ref.device}")
    if t.dtype != ref.dtype:
        _fail(op, f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; cast them to one dtype")


def _param(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Small parameter tables (freqs, LayerNorm weights) go to every backend in fp32 (in fp64 for
    fp64 inputs, which the reference serves): the one place they are converted."""
    return t.to(torch.promote_types(like.dtype, torch.float32))


def _check_modulation(op: str, x, packed, **rows):
    _check_tokens(op, x, "x", packed, 2, "[N, D]")
    for name, t in rows.items():
        _check_like(op, t, name, x, "x", (packed.num_seqs, x.shape[1]), "[B, D] (one row per image)")


def adaln_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, packed: PackedSeqs, *,
                   eps: float = 1e-6, backend: Optional[str] = None) -> torch.Tensor:
    """Packed AdaLN modulation: ``y = LN(x) * (1 + scale[seg]) + shift[seg]``.

    x [N, D]; shift, scale [B, D], one row per image; LN has no affine parameters and uses the
    biased variance over D. Returns y [N, D] in x's dtype.
    """
    op = "adaln_modulate"
    _check_packed(op, packed)
    _check_modulation(op, x, packed, shift=shift, scale=scale)
    fn = dispatch.kernel(op, x.device, x.dtype, backend)
    return fn(x, shift, scale, packed.cu_seqlens, float(eps))


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, packed: PackedSeqs, *,
                   backend: Optional[str] = None) -> torch.Tensor:
    """``x + gate[seg] * y``; x, y [N, D], gate [B, D]."""
    op = "gated_residual"
    _check_packed(op, packed)
    _check_modulation(op, x, packed, gate=gate)
    _check_like(op, y, "y", x, "x", tuple(x.shape), "[N, D]")
    fn = dispatch.kernel(op, x.device, x.dtype, backend)
    return fn(x, y, gate, packed.cu_seqlens)


def residual_adaln(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                   packed: PackedSeqs, *, eps: float = 1e-6,
                   backend: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual joined to the next AdaLN in one pass.

    ``x_new = x + gate[seg] * y``; ``h = LN(x_new) * (1 + scale[seg]) + shift[seg]``.
    x, y [N, D]; gate, shift, scale [B, D]. Returns (x_new, h).
    """
    op = "residual_adaln"
    _check_packed(op, packed)
    _check_modulation(op, x, packed, gate=gate, shift=shift, scale=scale)
    _check_like(op, y, "y", x, "x", tuple(x.shape), "[N, D]")
    fn = dispatch.kernel(op, x.device, x.dtype, backend)
    return fn(x, y, gate, shift, scale, packed.cu_seqlens, float(eps))


def _check_rope(op: str, q, k, packed, freqs, positions):
    _check_packed(op, packed)
    _check_tokens(op, q, "q", packed, 3, "[N, H, Dh]")
    _check_tokens(op, k, "k", packed, 3, "[N, Hk, Dh]")
    dh = q.shape[-1]
    if q.shape[1] == 0 or k.shape[1] == 0:
        _fail(op, f"q and k need at least one head, got {q.shape[1]} q heads and {k.shape[1]} k heads")
    if dh % 4 or dh == 0:
        _fail(op, f"head_dim must be a positive multiple of 4 for axial 2D RoPE (two axes of interleaved pairs), "
                  f"got {dh}")
    if k.shape[-1] != dh:
        _fail(op, f"q and k must share head_dim, got {dh} and {k.shape[-1]}")
    if k.dtype != q.dtype:
        _fail(op, f"k has dtype {k.dtype} but q has {q.dtype}; cast them to one dtype")
    _check_tensor(op, freqs, "freqs", 2, "[2, head_dim // 4] (see rope_freqs)")
    if tuple(freqs.shape) != (2, dh // 4):
        _fail(op, f"freqs must have shape (2, {dh // 4}) for head_dim {dh} (see rope_freqs), got {tuple(freqs.shape)}")
    if freqs.device != q.device:
        _fail(op, f"freqs is on {freqs.device} but q is on {q.device}")
    if positions not in POSITIONS:
        _fail(op, f"positions must be 'grid' or 'official', got {positions!r}")


def rope_2d(q: torch.Tensor, k: torch.Tensor, packed: PackedSeqs, freqs: torch.Tensor, *,
            positions: str = "grid", mscale: float = 1.0,
            backend: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Axial 2D rotary embedding of q [N, H, Dh] and k [N, Hk, Dh]; Dh % 4 == 0.

    The first half of Dh rotates with axis-0 position p0 and freqs[0], the second half with
    axis-1 position p1 and freqs[1]; within each half, interleaved pairs (2i, 2i+1) rotate by
    angle p * freqs[a][i]: (x0, x1) -> mscale * (x0 cos - x1 sin, x1 cos + x0 sin).
    positions="grid": p0 = t % w, p1 = t // w (true 2D positions); "official": p0 = t % h,
    p1 = t // h (what the released NiT checkpoints were trained with). Angles come from the
    pack's cu_seqlens and sizes: no per-token table is built. freqs [2, Dh/4] from rope_freqs.
    """
    op = "rope_2d"
    _check_rope(op, q, k, packed, freqs, positions)
    fn = dispatch.kernel(op, q.device, q.dtype, backend, head_dim=q.shape[-1])
    return fn(q, k, packed.cu_seqlens, packed.sizes, _param(freqs, q), positions, float(mscale))


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, packed: PackedSeqs, freqs: torch.Tensor, *,
                 q_weight: torch.Tensor, q_bias: torch.Tensor, k_weight: torch.Tensor, k_bias: torch.Tensor,
                 eps: float = 1e-5, positions: str = "grid", mscale: float = 1.0,
                 backend: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm over Dh with affine (the official qk_norm) of q and k, then rope_2d, in one pass.

    q [N, H, Dh], k [N, Hk, Dh]; weights and biases [Dh].
    """
    op = "qk_norm_rope"
    _check_rope(op, q, k, packed, freqs, positions)
    dh = q.shape[-1]
    for name, t in (("q_weight", q_weight), ("q_bias", q_bias), ("k_weight", k_weight), ("k_bias", k_bias)):
        _check_tensor(op, t, name, 1, f"[{dh}]")
        if t.shape[0] != dh:
            _fail(op, f"{name} must have shape ({dh},) (head_dim), got {tuple(t.shape)}")
        if t.device != q.device:
            _fail(op, f"{name} is on {t.device} but q is on {q.device}")
    fn = dispatch.kernel(op, q.device, q.dtype, backend, head_dim=dh)
    params = (_param(t, q) for t in (freqs, q_weight, q_bias, k_weight, k_bias))
    return fn(q, k, packed.cu_seqlens, packed.sizes, *params, float(eps), positions, float(mscale))


def _check_cu(op: str, cu, name: str, device: torch.device):
    if not isinstance(cu, torch.Tensor):
        _fail(op, f"{name} must be an int32 tensor [B+1], got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        _fail(op, f"{name} must be int32, got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 2:
        _fail(op, f"{name} must be 1-D with B+1 >= 2 entries, got shape {tuple(cu.shape)}")
    if cu.device != device:
        _fail(op, f"{name} is on {cu.device} but q is on {device}")


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, *,
                     softmax_scale: Optional[float] = None, causal: bool = False,
                     backend: Optional[str] = None) -> torch.Tensor:
    """Attention inside each packed sequence only; the positional signature of flash_attn_varlen_func.

    q [Nq, H, D], k [Nk, Hk, D], v [Nk, Hk, D] with H a multiple of Hk; cu_seqlens int32 [B+1];
    max_seqlen_* Python ints in [0, 2**31 - 1] at least the longest sequence, computed once per pack
    on the host. A strided cu_seqlens is accepted (copied). softmax_scale (finite) defaults to
    D ** -0.5. causal masks are aligned bottom-right as in flash-attn >= 2.1; a query that sees no
    key outputs 0. NaN and inf flow as through softmax(scale * q k^T) v. Returns [Nq, H, D].
    On CPU tensors the contents of cu_seqlens are validated; on GPU they are trusted (no sync).
    """
    op = "varlen_attention"
    _check_tensor(op, q, "q", 3, "[Nq, H, D]")
    _check_tensor(op, k, "k", 3, "[Nk, Hk, D]")
    _check_tensor(op, v, "v", 3, "[Nk, Hk, D]")
    for name, t in (("k", k), ("v", v)):
        if t.device != q.device:
            _fail(op, f"{name} is on {t.device} but q is on {q.device}")
        if t.dtype != q.dtype:
            _fail(op, f"{name} has dtype {t.dtype} but q has {q.dtype}; cast them to one dtype")
    if k.shape[-1] != q.shape[-1]:
        _fail(op, f"q and k must share head_dim, got {q.shape[-1]} and {k.shape[-1]}")
    if v.shape[:2] != k.shape[:2]:
        _fail(op, f"v must have k's tokens and heads {tuple(k.shape[:2])}, got {tuple(v.shape[:2])}")
    if q.shape[1] == 0 or k.shape[1] == 0:
        _fail(op, f"q and k/v need at least one head, got {q.shape[1]} q heads and {k.shape[1]} k/v heads")
    if q.shape[1] % k.shape[1]:
        _fail(op, f"q heads ({q.shape[1]}) must be a multiple of k/v heads ({k.shape[1]})")
    if q.shape[-1] == 0 or v.shape[-1] == 0:
        _fail(op, f"head_dim must be positive, got {q.shape[-1]} for q/k and {v.shape[-1]} for v")
    _check_cu(op, cu_seqlens_q, "cu_seqlens_q", q.device)
    _check_cu(op, cu_seqlens_k, "cu_seqlens_k", q.device)
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        _fail(op, f"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, "
                  f"got {cu_seqlens_q.numel() - 1} and {cu_seqlens_k.numel() - 1}")
    for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        # at most the int32 range of cu_seqlens (a SymInt passes while tracing)
        if isinstance(m, (torch.Tensor, bool)) or not isinstance(m, (int, torch.SymInt)) or not 0 <= m < 2**31:
            _fail(op, f"{name} must be a Python int in [0, 2**31 - 1] (the longest sequence, computed once per "
                      f"pack), got {m!r}")
    if softmax_scale is not None:
        try:
            finite = math.isfinite(float(softmax_scale))
        except (TypeError, ValueError):
            finite = False
        if not finite:
            _fail(op, f"softmax_scale must be a finite float or None, got {softmax_scale!r}")
    # a strided cu_seqlens is accepted, as q, k and v are: every backend gets a contiguous copy
    cu_seqlens_q, cu_seqlens_k = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()
    if q.device.type == "cpu" and not torch.compiler.is_compiling():
        longest = None
        for name, cu, n, m in (("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q),
                               ("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k)):
            # one host read per distinct tensor: self-attention passes one cu_seqlens twice
            if longest is None or cu is not cu_seqlens_q or n != q.shape[0]:
                try:
                    longest = validate_cu_seqlens(cu, n, name)
                except ValueError as e:
                    _fail(op, str(e))
            if longest > m:
                _fail(op, f"max_seqlen_{name[-1]}={m} is smaller than the longest sequence ({longest})")
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    # operator.index: head counts are symbolic under torch.compile(dynamic=True), the choice of a
    # backend needs constants (see dispatch.kernel)
    gqa = operator.index(k.shape[1]) != operator.index(q.shape[1])
    fn = dispatch.kernel(op, q.device, q.dtype, backend, head_dim=q.shape[-1], gqa=gqa, causal=bool(causal))
    return fn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, bool(causal))


def _check_bias_gelu(op: str, x, bias, dy=None):
    _check_tensor(op, x, "x", 2, "[N, H]")
    _check_tensor(op, bias, "bias", 1, f"[H] = [{x.shape[1]}]")
    if bias.shape[0] != x.shape[1]:
        _fail(op, f"bias must have shape [{x.shape[1]}] (the last dim of x {tuple(x.shape)}), got {tuple(bias.shape)}")
    if bias.device != x.device:
        _fail(op, f"bias is on {bias.device} but x is on {x.device}")
    if dy is not None:
        _check_tensor(op, dy, "dy", 2, f"[N, H] = {list(x.shape)}")
        if dy.shape != x.shape or dy.dtype != x.dtype or dy.device != x.device:
            _fail(op, f"dy must match x ({tuple(x.shape)}, {x.dtype}, {x.device}), "
                      f"got ({tuple(dy.shape)}, {dy.dtype}, {dy.device})")


def bias_gelu(x: torch.Tensor, bias: torch.Tensor, *, backend: Optional[str] = None) -> torch.Tensor:
    """``gelu_tanh(x + bias)``: x [N, H], bias [H] (any float dtype, e.g. fp32 weights with bf16 x).

    The bias and tanh-approximated GELU (``F.gelu(..., approximate="tanh")``) that follow a Linear
    computed without its bias. fp32 math; the output has x's dtype. Backends: cpu (csrc/cpu) and
    reference; every other call runs on the reference.
    """
    op = "bias_gelu"
    _check_bias_gelu(op, x, bias)
    fn = dispatch.kernel(op, x.device, x.dtype, backend)
    return fn(x, bias)


def bias_gelu_backward(dy: torch.Tensor, x: torch.Tensor, bias: torch.Tensor, *,
                       backend: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward of :func:`bias_gelu` in one pass: ``(dx, dbias, y)``.

    ``dx = dy * gelu_tanh'(x + bias)`` (x's dtype), ``dbias = dx.sum(0)`` (fp32 sums, bias's
    dtype) and ``y = bias_gelu(x, bias)`` recomputed, for callers that keep x rather than y for the
    weight gradient of the Linear that follows (selective recomputation). Not differentiable.
    """
    from .backends import reference

    op = "bias_gelu_backward"
    _check_bias_gelu(op, x, bias, dy)
    name, _ = dispatch.select(dispatch.Call("bias_gelu", x.device, x.dtype), backend)
    if name == "cpu":
        return tuple(torch.ops.nit.bias_gelu_bwd(dy.contiguous(), x.contiguous(), bias.contiguous()))
    return reference.bias_gelu_bwd(dy, x, bias)
