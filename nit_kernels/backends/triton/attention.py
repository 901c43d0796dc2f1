"""Triton varlen attention: FlashAttention-2 forward and backward keyed on cu_seqlens.

q [Nq, H, D], k [Nk, Hk, D], v [Nk, Hk, Dv], H a multiple of Hk (grouped-query heads);
sequence b owns query rows cu_q[b]..cu_q[b+1]-1 and key rows cu_k[b]..cu_k[b+1]-1.
out = softmax(scale * q k^T) v inside each sequence. Causal masks are bottom-right aligned
(query i of a sequence with sq queries and sk keys sees keys j <= i + sk - sq, as flash-attn >= 2.1);
a query that sees no key outputs 0.

The algorithm is FlashAttention-2 (Tri Dao, "FlashAttention-2: Faster Attention with Better
Parallelism and Work Partitioning", 2023), in the shape of the Triton "fused attention" tutorial:
  schedule  grid (work item, head): the pack's (sequence, query tile) items, or (sequence, key tile)
            for dK/dV, enumerated by a small table computed from cu_seqlens (tile_table); no program
            is spent on tiles past a short sequence's end, whatever max_seqlen is;
  forward   per query tile: K/V blocks streamed with an online softmax in base 2
            (scores pre-multiplied by scale*log2(e)); saves lse2 = m + log2(l) per row [H, Nq]
            (+inf for a row without keys, so that its probabilities recompute to 0);
  backward  delta = rowsum(dO * O) [H, Nq]; one kernel per key block accumulates dK and dV over
            the query blocks (and the query heads sharing that k/v head), one per query block
            accumulates dQ over the key blocks: no atomics, deterministic. dS enters the dK and dQ
            products as two fp16/bf16 terms (its value and its rounding error), see _dot_fp32_lhs.
Each loop runs in two phases: blocks that need no mask, then the few on the causal diagonal or
the sequence end. A head dim that is not a power of two is covered by two blocks, a power of two
and a small tail (72 -> 64 + 16, see split_head_dim), not padded to the next power of two.
fp32 inputs use exact fp32 dots (input_precision="ieee") unless torch.backends.cuda.matmul.allow_tf32.
Block sizes come from autotune configs (Ampere and Hopper) on a GPU and from one fixed large
config under the interpreter, whose cost is per program and whose autotuner cannot benchmark.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common
from ._checks import check_grid, check_shape, checked_cu, fail
from ._common import INTERPRETED, cast_to, segment_of_scalar, tile_table, wrap_triton

Tensor = torch.Tensor

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
_INTERPRETER_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64}
TILE_BLOCKS = (16, 32, 64, 128)  # every BLOCK_M / BLOCK_N of the configs: one work-item row each


@triton.jit
def _work_item(tiles_ptr, B, BLOCK: tl.constexpr):
    """This program's work item: (sequence b, first row of its tile, live).

    tiles_ptr is the [len(TILE_BLOCKS), B+1] table of tile_table; the row of this kernel's tile
    size lists the (sequence, tile) items of the pack. The grid has an upper bound of items known
    on the host (cdiv(N, BLOCK) + B), so a few trailing programs are not live and exit at once.
    """
    tl.static_assert(BLOCK == 16 or BLOCK == 32 or BLOCK == 64 or BLOCK == 128)
    if BLOCK == 16:
        tab = tiles_ptr
    elif BLOCK == 32:
        tab = tiles_ptr + (B + 1)
    elif BLOCK == 64:
        tab = tiles_ptr + 2 * (B + 1)
    else:
        tab = tiles_ptr + 3 * (B + 1)
    pid = tl.program_id(0)
    b = segment_of_scalar(tab, pid, B)
    live = pid < tl.load(tab + B)
    return b, (pid - tl.load(tab + b)) * BLOCK, live


@triton.jit
def _aligned(stride, ALIGN: tl.constexpr):
    """`stride` (a multiple of ALIGN elements, checked on the host) in a form whose divisibility the
    compiler can see.

    Triton learns only divisibility by 16 from integer arguments; with head_dim 72 the head stride
    (72) is a multiple of 8, which is what 16-byte vector loads and the pipelined (cp.async) copies
    of K/V tiles need. Without this the loads of a 72-wide head are scalar and the kernels spill.
    (tl.multiple_of does not attach to a kernel argument; (s // A) * A is exact and analysable.)
    """
    if ALIGN > 1:
        stride = (stride // ALIGN) * ALIGN
    return stride


@triton.jit
def _dot_fp32_lhs(a, b, acc, DOT_PREC: tl.constexpr):
    """acc + a @ b for an fp32 `a` (dS) and a `b` in fp16/bf16: `a` enters as hi + lo in b's dtype.

    dS = P * (dP - delta) sums with cancellation into dK and dQ; rounded once to fp16/bf16 it costs
    up to about 2 ulp of the result. With the rounding error carried as a second term (one more
    tensor-core dot) the error is that of an fp32 sum. fp32 inputs take a single dot.
    """
    hi = a.to(b.dtype)
    acc = tl.dot(hi, b, acc, input_precision=DOT_PREC)
    if b.dtype != tl.float32:
        acc = tl.dot((a - hi.to(tl.float32)).to(b.dtype), b, acc, input_precision=DOT_PREC)
    return acc


@triton.jit
def _load(base, idx, stride, ok, c, D: tl.constexpr, MASK_IDX: tl.constexpr):
    """Tile [len(idx), len(c)]: element (i, d) = base[idx[i] * stride + c[d]], zero where c[d] >= D
    (and where not ok[i], when MASK_IDX)."""
    mask = (c < D)[None, :]
    if MASK_IDX:
        mask = mask & ok[:, None]
    return tl.load(base + idx.to(tl.int64)[:, None] * stride + c[None, :], mask=mask, other=0.0)


@triton.jit
def _load_t(base, idx, stride, ok, c, D: tl.constexpr, MASK_IDX: tl.constexpr):
    """The transposed tile [len(c), len(idx)] of _load."""
    mask = (c < D)[:, None]
    if MASK_IDX:
        mask = mask & ok[None, :]
    return tl.load(base + idx.to(tl.int64)[None, :] * stride + c[:, None], mask=mask, other=0.0)


@triton.jit
def _store(base, idx, stride, ok, c, D: tl.constexpr, val):
    tl.store(base + idx.to(tl.int64)[:, None] * stride + c[None, :], cast_to(val, base),
             mask=ok[:, None] & (c < D)[None, :])


@triton.jit
def _load_split(base, idx, stride, ok, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D1: tl.constexpr,
                TAIL: tl.constexpr):
    """A [len(idx), D] tile as (head block [., BLOCK_D], tail block [., BLOCK_D1]; zeros without TAIL)."""
    c = tl.arange(0, BLOCK_D)
    x0 = _load(base, idx, stride, ok, c, D, True)
    if TAIL:
        x1 = _load(base, idx, stride, ok, BLOCK_D + tl.arange(0, BLOCK_D1), D, True)
    else:
        x1 = tl.zeros([idx.shape[0], BLOCK_D1], dtype=x0.dtype)
    return x0, x1


@triton.jit
def _store_split(base, idx, stride, ok, D: tl.constexpr, x0, x1, BLOCK_D: tl.constexpr, BLOCK_D1: tl.constexpr,
                 TAIL: tl.constexpr):
    _store(base, idx, stride, ok, tl.arange(0, BLOCK_D), D, x0)
    if TAIL:
        _store(base, idx, stride, ok, BLOCK_D + tl.arange(0, BLOCK_D1), D, x1)


@triton.jit
def _fwd_inner(acc0, acc1, l_i, m_i, q0, q1, k_base, v_base, s_kt, s_vt, rows, n_lo, n_hi, len_k, diag, qk_scale,
               D: tl.constexpr, DV: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
               DOT_PREC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D1: tl.constexpr,
               TAIL: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_DV1: tl.constexpr, TAIL_V: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    c0, e0 = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    c1, e1 = BLOCK_D + tl.arange(0, BLOCK_D1), BLOCK_DV + tl.arange(0, BLOCK_DV1)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        cols = n0 + offs_n
        col_ok = cols < len_k
        s = tl.dot(q0, _load_t(k_base, cols, s_kt, col_ok, c0, D, MASKED), input_precision=DOT_PREC)
        if TAIL:
            s = tl.dot(q1, _load_t(k_base, cols, s_kt, col_ok, c1, D, MASKED), s, input_precision=DOT_PREC)
        s = s * qk_scale
        if MASKED:
            ok = col_ok[None, :]
            if CAUSAL:
                ok = ok & (cols[None, :] <= rows[:, None] + diag)
            s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row without keys so far: no -inf - -inf
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v0 = _load(v_base, cols, s_vt, col_ok, e0, DV, MASKED)
        acc0 = tl.dot(p.to(v0.dtype), v0, acc0 * alpha[:, None], input_precision=DOT_PREC)
        if TAIL_V:
            v1 = _load(v_base, cols, s_vt, col_ok, e1, DV, MASKED)
            acc1 = tl.dot(p.to(v1.dtype), v1, acc1 * alpha[:, None], input_precision=DOT_PREC)
        m_i = m_new
    return acc0, acc1, l_i, m_i


@triton.jit
def _key_ranges(m0, len_k, diag, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """For query rows m0..m0+BLOCK_M-1: keys [0, n_full) need no mask, [n_full, n_hi) do."""
    whole = (len_k // BLOCK_N) * BLOCK_N
    if CAUSAL:
        n_hi = tl.minimum(len_k, tl.maximum(m0 + BLOCK_M + diag, 0))
        n_full = tl.minimum(whole, (tl.maximum(m0 + diag + 1, 0) // BLOCK_N) * BLOCK_N)
    else:
        n_hi = len_k
        n_full = whole
    return n_full, n_hi


@triton.jit
def _sequence(cu_q_ptr, cu_k_ptr, b):
    """(q_start, len_q, k_start, len_k, diag) of sequence b; diag = len_k - len_q aligns the causal
    mask bottom-right."""
    q_start = tl.load(cu_q_ptr + b)
    len_q = tl.load(cu_q_ptr + b + 1) - q_start
    k_start = tl.load(cu_k_ptr + b)
    len_k = tl.load(cu_k_ptr + b + 1) - k_start
    return q_start, len_q, k_start, len_k, len_k - len_q


@triton.jit
def _aligned_qkv(s_qt, s_qh, s_kt, s_kh, s_vt, s_vh, ALIGN: tl.constexpr):
    """_aligned of the token and head strides of q, k and v."""
    return (_aligned(s_qt, ALIGN), _aligned(s_qh, ALIGN), _aligned(s_kt, ALIGN), _aligned(s_kh, ALIGN),
            _aligned(s_vt, ALIGN), _aligned(s_vh, ALIGN))


@triton.jit
def _attn_fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, cu_q_ptr, cu_k_ptr, tiles_ptr, B,
                     s_qt, s_qh, s_kt, s_kh, s_vt, s_vh, s_ot, s_oh, n_q_total, group, qk_scale,
                     D: tl.constexpr, DV: tl.constexpr, CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr,
                     ALIGN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_D1: tl.constexpr, TAIL: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_DV1: tl.constexpr,
                     TAIL_V: tl.constexpr):
    s_qt, s_qh, s_kt, s_kh, s_vt, s_vh = _aligned_qkv(s_qt, s_qh, s_kt, s_kh, s_vt, s_vh, ALIGN)
    s_ot, s_oh = _aligned(s_ot, ALIGN), _aligned(s_oh, ALIGN)
    b, m0, live = _work_item(tiles_ptr, B, BLOCK_M)  # a query tile of sequence b
    h = tl.program_id(1)
    if live:
        q_start, len_q, k_start, len_k, diag = _sequence(cu_q_ptr, cu_k_ptr, b)
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < len_q
        q0, q1 = _load_split(q_ptr + h * s_qh, q_start + rows, s_qt, row_ok, D, BLOCK_D, BLOCK_D1, TAIL)
        hk = h // group
        k_base = k_ptr + k_start.to(tl.int64) * s_kt + hk * s_kh
        v_base = v_ptr + k_start.to(tl.int64) * s_vt + hk * s_vh
        acc0 = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
        acc1 = tl.zeros([BLOCK_M, BLOCK_DV1], dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        n_full, n_hi = _key_ranges(m0, len_k, diag, CAUSAL, BLOCK_M, BLOCK_N)
        acc0, acc1, l_i, m_i = _fwd_inner(acc0, acc1, l_i, m_i, q0, q1, k_base, v_base, s_kt, s_vt, rows, 0, n_full,
                                          len_k, diag, qk_scale, D, DV, False, CAUSAL, DOT_PREC, BLOCK_N, BLOCK_D,
                                          BLOCK_D1, TAIL, BLOCK_DV, BLOCK_DV1, TAIL_V)
        acc0, acc1, l_i, m_i = _fwd_inner(acc0, acc1, l_i, m_i, q0, q1, k_base, v_base, s_kt, s_vt, rows, n_full,
                                          n_hi, len_k, diag, qk_scale, D, DV, True, CAUSAL, DOT_PREC, BLOCK_N,
                                          BLOCK_D, BLOCK_D1, TAIL, BLOCK_DV, BLOCK_DV1, TAIL_V)
        empty = l_i == 0.0
        denom = tl.where(empty, 1.0, l_i)[:, None]
        _store_split(o_ptr + h * s_oh, q_start + rows, s_ot, row_ok, DV, acc0 / denom, acc1 / denom, BLOCK_DV,
                     BLOCK_DV1, TAIL_V)
        lse = tl.where(empty, float("inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
        tl.store(lse_ptr + h.to(tl.int64) * n_q_total + q_start + rows, lse, mask=row_ok)


@triton.jit
def _attn_delta_kernel(o_ptr, do_ptr, delta_ptr, n_q_total, s_ot, s_oh, s_dot, s_doh,
                       DV: tl.constexpr, ALIGN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr):
    """delta[h, i] = sum_d dO[i, h, d] * O[i, h, d] (fp32), the FlashAttention-2 backward preprocess."""
    s_ot, s_oh = _aligned(s_ot, ALIGN), _aligned(s_oh, ALIGN)
    s_dot, s_doh = _aligned(s_dot, ALIGN), _aligned(s_doh, ALIGN)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    h = tl.program_id(1)
    cols = tl.arange(0, BLOCK_DV)
    mask = (rows < n_q_total)[:, None] & (cols < DV)[None, :]
    r = rows.to(tl.int64)[:, None]
    o = tl.load(o_ptr + r * s_ot + h * s_oh + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    do = tl.load(do_ptr + r * s_dot + h * s_doh + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(delta_ptr + h.to(tl.int64) * n_q_total + rows, tl.sum(o * do, axis=1), mask=rows < n_q_total)


@triton.jit
def _dkdv_inner(dk0, dk1, dv0, dv1, k0, k1, v0, v1, q_base, do_base, lse_base, delta_base, s_qt, s_dot, cols, m_lo,
                m_hi, len_q, diag, qk_scale, D: tl.constexpr, DV: tl.constexpr, MASKED: tl.constexpr,
                DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D1: tl.constexpr,
                TAIL: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_DV1: tl.constexpr, TAIL_V: tl.constexpr):
    """Accumulate dV += P^T dO and dK += dS^T Q over query blocks [m_lo, m_hi) (dK still unscaled).

    Rows past the sequence load q = dO = 0, lse = +inf, so their probabilities are 0 without a mask.
    """
    for m0 in range(m_lo, m_hi, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < len_q
        q0, q1 = _load_split(q_base, rows, s_qt, row_ok, D, BLOCK_D, BLOCK_D1, TAIL)
        do0, do1 = _load_split(do_base, rows, s_dot, row_ok, DV, BLOCK_DV, BLOCK_DV1, TAIL_V)
        lse = tl.load(lse_base + rows, mask=row_ok, other=float("inf"))
        delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
        st = tl.dot(k0, tl.trans(q0), input_precision=DOT_PREC)  # [BLOCK_N, BLOCK_M]
        if TAIL:
            st = tl.dot(k1, tl.trans(q1), st, input_precision=DOT_PREC)
        pt = tl.exp2(st * qk_scale - lse[None, :])
        if MASKED:
            pt = tl.where(cols[:, None] <= rows[None, :] + diag, pt, 0.0)
        dv0 = tl.dot(pt.to(do0.dtype), do0, dv0, input_precision=DOT_PREC)
        dpt = tl.dot(v0, tl.trans(do0), input_precision=DOT_PREC)
        if TAIL_V:
            dv1 = tl.dot(pt.to(do1.dtype), do1, dv1, input_precision=DOT_PREC)
            dpt = tl.dot(v1, tl.trans(do1), dpt, input_precision=DOT_PREC)
        dst = pt * (dpt - delta[None, :])
        dk0 = _dot_fp32_lhs(dst, q0, dk0, DOT_PREC)
        if TAIL:
            dk1 = _dot_fp32_lhs(dst, q1, dk1, DOT_PREC)
    return dk0, dk1, dv0, dv1


@triton.jit
def _attn_bwd_dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, cu_q_ptr, cu_k_ptr,
                          tiles_ptr, B,
                          s_qt, s_qh, s_kt, s_kh, s_vt, s_vh, s_dot, s_doh, s_dkt, s_dkh, s_dvt, s_dvh,
                          n_q_total, group, qk_scale, sm_scale,
                          D: tl.constexpr, DV: tl.constexpr, CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr,
                          ALIGN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                          BLOCK_D1: tl.constexpr, TAIL: tl.constexpr, BLOCK_DV: tl.constexpr,
                          BLOCK_DV1: tl.constexpr, TAIL_V: tl.constexpr):
    s_qt, s_qh, s_kt, s_kh, s_vt, s_vh = _aligned_qkv(s_qt, s_qh, s_kt, s_kh, s_vt, s_vh, ALIGN)
    s_dot, s_doh = _aligned(s_dot, ALIGN), _aligned(s_doh, ALIGN)
    s_dkt, s_dkh = _aligned(s_dkt, ALIGN), _aligned(s_dkh, ALIGN)
    s_dvt, s_dvh = _aligned(s_dvt, ALIGN), _aligned(s_dvh, ALIGN)
    b, n0, live = _work_item(tiles_ptr, B, BLOCK_N)  # a key tile of sequence b
    hk = tl.program_id(1)
    if live:
        q_start, len_q, k_start, len_k, diag = _sequence(cu_q_ptr, cu_k_ptr, b)
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < len_k
        k0, k1 = _load_split(k_ptr + hk * s_kh, k_start + cols, s_kt, col_ok, D, BLOCK_D, BLOCK_D1, TAIL)
        v0, v1 = _load_split(v_ptr + hk * s_vh, k_start + cols, s_vt, col_ok, DV, BLOCK_DV, BLOCK_DV1, TAIL_V)
        dk0 = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dk1 = tl.zeros([BLOCK_N, BLOCK_D1], dtype=tl.float32)
        dv0 = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
        dv1 = tl.zeros([BLOCK_N, BLOCK_DV1], dtype=tl.float32)
        if CAUSAL:
            # rows >= n0 - diag see some of these keys; rows >= n0 + BLOCK_N - 1 - diag see all of them
            m_lo = (tl.maximum(n0 - diag, 0) // BLOCK_M) * BLOCK_M
            m_mid = tl.maximum(m_lo, tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - diag, 0), BLOCK_M) * BLOCK_M)
        else:
            m_lo = 0
            m_mid = 0
        # the query heads that share this k/v head, walked by pointer increments
        h0 = hk * group
        q_base = q_ptr + q_start.to(tl.int64) * s_qt + h0 * s_qh
        do_base = do_ptr + q_start.to(tl.int64) * s_dot + h0 * s_doh
        lse_base = lse_ptr + h0.to(tl.int64) * n_q_total + q_start
        delta_base = delta_ptr + h0.to(tl.int64) * n_q_total + q_start
        for _ in range(0, group):
            dk0, dk1, dv0, dv1 = _dkdv_inner(dk0, dk1, dv0, dv1, k0, k1, v0, v1, q_base, do_base, lse_base,
                                             delta_base, s_qt, s_dot, cols, m_lo, tl.minimum(m_mid, len_q), len_q,
                                             diag, qk_scale, D, DV, True, DOT_PREC, BLOCK_M, BLOCK_D, BLOCK_D1, TAIL,
                                             BLOCK_DV, BLOCK_DV1, TAIL_V)
            dk0, dk1, dv0, dv1 = _dkdv_inner(dk0, dk1, dv0, dv1, k0, k1, v0, v1, q_base, do_base, lse_base,
                                             delta_base, s_qt, s_dot, cols, m_mid, len_q, len_q, diag, qk_scale, D,
                                             DV, False, DOT_PREC, BLOCK_M, BLOCK_D, BLOCK_D1, TAIL, BLOCK_DV,
                                             BLOCK_DV1, TAIL_V)
            q_base += s_qh
            do_base += s_doh
            lse_base += n_q_total
            delta_base += n_q_total
        _store_split(dk_ptr + hk * s_dkh, k_start + cols, s_dkt, col_ok, D, dk0 * sm_scale, dk1 * sm_scale,
                     BLOCK_D, BLOCK_D1, TAIL)
        _store_split(dv_ptr + hk * s_dvh, k_start + cols, s_dvt, col_ok, DV, dv0, dv1, BLOCK_DV, BLOCK_DV1, TAIL_V)


@triton.jit
def _dq_inner(dq0, dq1, q0, q1, do0, do1, lse, delta, k_base, v_base, s_kt, s_vt, rows, n_lo, n_hi, len_k, diag,
              qk_scale, D: tl.constexpr, DV: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
              DOT_PREC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D1: tl.constexpr,
              TAIL: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_DV1: tl.constexpr, TAIL_V: tl.constexpr):
    """Accumulate dQ += dS K over key blocks [n_lo, n_hi) (unscaled)."""
    offs_n = tl.arange(0, BLOCK_N)
    c0, e0 = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    c1, e1 = BLOCK_D + tl.arange(0, BLOCK_D1), BLOCK_DV + tl.arange(0, BLOCK_DV1)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        cols = n0 + offs_n
        col_ok = cols < len_k
        kt0 = _load_t(k_base, cols, s_kt, col_ok, c0, D, MASKED)  # [BLOCK_D, BLOCK_N]
        s = tl.dot(q0, kt0, input_precision=DOT_PREC)
        if TAIL:
            kt1 = _load_t(k_base, cols, s_kt, col_ok, c1, D, MASKED)
            s = tl.dot(q1, kt1, s, input_precision=DOT_PREC)
        p = tl.exp2(s * qk_scale - lse[:, None])
        if MASKED:
            # zeroed, not -inf'd: a masked key past the end has k = 0 and could give p = inf, and inf * 0 = nan
            ok = col_ok[None, :]
            if CAUSAL:
                ok = ok & (cols[None, :] <= rows[:, None] + diag)
            p = tl.where(ok, p, 0.0)
        dp = tl.dot(do0, _load_t(v_base, cols, s_vt, col_ok, e0, DV, MASKED), input_precision=DOT_PREC)
        if TAIL_V:
            dp = tl.dot(do1, _load_t(v_base, cols, s_vt, col_ok, e1, DV, MASKED), dp, input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq0 = _dot_fp32_lhs(ds, tl.trans(kt0), dq0, DOT_PREC)
        if TAIL:
            dq1 = _dot_fp32_lhs(ds, tl.trans(kt1), dq1, DOT_PREC)
    return dq0, dq1


@triton.jit
def _attn_bwd_dq_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, cu_q_ptr, cu_k_ptr, tiles_ptr, B,
                        s_qt, s_qh, s_kt, s_kh, s_vt, s_vh, s_dot, s_doh, s_dqt, s_dqh, n_q_total, group,
                        qk_scale, sm_scale,
                        D: tl.constexpr, DV: tl.constexpr, CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr,
                        ALIGN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_D1: tl.constexpr, TAIL: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_DV1: tl.constexpr,
                        TAIL_V: tl.constexpr):
    s_qt, s_qh, s_kt, s_kh, s_vt, s_vh = _aligned_qkv(s_qt, s_qh, s_kt, s_kh, s_vt, s_vh, ALIGN)
    s_dot, s_doh = _aligned(s_dot, ALIGN), _aligned(s_doh, ALIGN)
    s_dqt, s_dqh = _aligned(s_dqt, ALIGN), _aligned(s_dqh, ALIGN)
    b, m0, live = _work_item(tiles_ptr, B, BLOCK_M)  # a query tile of sequence b
    h = tl.program_id(1)
    if live:
        q_start, len_q, k_start, len_k, diag = _sequence(cu_q_ptr, cu_k_ptr, b)
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < len_q
        q0, q1 = _load_split(q_ptr + h * s_qh, q_start + rows, s_qt, row_ok, D, BLOCK_D, BLOCK_D1, TAIL)
        do0, do1 = _load_split(do_ptr + h * s_doh, q_start + rows, s_dot, row_ok, DV, BLOCK_DV, BLOCK_DV1, TAIL_V)
        lse = tl.load(lse_ptr + h.to(tl.int64) * n_q_total + q_start + rows, mask=row_ok, other=float("inf"))
        delta = tl.load(delta_ptr + h.to(tl.int64) * n_q_total + q_start + rows, mask=row_ok, other=0.0)
        hk = h // group
        k_base = k_ptr + k_start.to(tl.int64) * s_kt + hk * s_kh
        v_base = v_ptr + k_start.to(tl.int64) * s_vt + hk * s_vh
        dq0 = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        dq1 = tl.zeros([BLOCK_M, BLOCK_D1], dtype=tl.float32)
        n_full, n_hi = _key_ranges(m0, len_k, diag, CAUSAL, BLOCK_M, BLOCK_N)
        dq0, dq1 = _dq_inner(dq0, dq1, q0, q1, do0, do1, lse, delta, k_base, v_base, s_kt, s_vt, rows, 0, n_full,
                             len_k, diag, qk_scale, D, DV, False, CAUSAL, DOT_PREC, BLOCK_N, BLOCK_D, BLOCK_D1, TAIL,
                             BLOCK_DV, BLOCK_DV1, TAIL_V)
        dq0, dq1 = _dq_inner(dq0, dq1, q0, q1, do0, do1, lse, delta, k_base, v_base, s_kt, s_vt, rows, n_full, n_hi,
                             len_k, diag, qk_scale, D, DV, True, CAUSAL, DOT_PREC, BLOCK_N, BLOCK_D, BLOCK_D1, TAIL,
                             BLOCK_DV, BLOCK_DV1, TAIL_V)
        _store_split(dq_ptr + h * s_dqh, q_start + rows, s_dqt, row_ok, D, dq0 * sm_scale, dq1 * sm_scale,
                     BLOCK_D, BLOCK_D1, TAIL)


# ---------------------------------------------------------------------------------------------
# autotune configs (GPU): (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel and operand class,
# "d64": fp16/bf16 with head dim <= 64, "d128": fp16/bf16 with head dim 65..128, "fp32": fp32
# operands (FMA dots: twice the registers and shared memory). Picked with compile_check, which
# builds each for sm_80 and sm_90 and reports registers, spills and shared memory; the autotuner
# then times the survivors on the device (dK/dV hold BLOCK_N keys and stream BLOCK_M queries, dQ
# the other way round).
# ---------------------------------------------------------------------------------------------
_CONFIG_TABLE = {
    "fwd": {"d64": [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 4), (64, 32, 4, 4)],
            "d128": [(128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 4, 4), (64, 32, 4, 4)],
            "fp32": [(32, 32, 4, 2), (16, 32, 4, 2), (32, 16, 4, 2), (16, 16, 4, 2)]},
    "dkdv": {"d64": [(32, 128, 8, 2), (32, 64, 4, 3), (64, 64, 4, 2), (64, 128, 8, 2)],
             "d128": [(32, 128, 8, 2), (32, 64, 4, 3), (16, 64, 4, 3)],
             "fp32": [(16, 32, 4, 2), (16, 16, 4, 2)]},
    "dq": {"d64": [(128, 32, 8, 2), (64, 32, 4, 3), (64, 64, 4, 2), (128, 64, 8, 2)],
           "d128": [(128, 32, 8, 2), (64, 32, 4, 3), (64, 16, 4, 3), (64, 64, 4, 2)],
           "fp32": [(32, 16, 4, 2), (16, 32, 4, 2), (16, 16, 4, 2)]},
}
_KEY = ["D", "DV", "CAUSAL", "DOT_PREC"]


def _config(m, n, w, s):
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)


def _operand_class(named_args: dict, kwargs: dict) -> str:
    if named_args["q_ptr"].dtype == torch.float32:
        return "fp32"
    width = max(kwargs.get("BLOCK_D", 64) + kwargs.get("BLOCK_D1", 16) * bool(kwargs.get("TAIL")),
                kwargs.get("BLOCK_DV", 64) + kwargs.get("BLOCK_DV1", 16) * bool(kwargs.get("TAIL_V")))
    return "d64" if width <= 64 else "d128"


def _tuned(kernel, table: dict):
    configs = {c: _config(*c) for cls in table.values() for c in cls}

    def prune(_all, named_args, **kwargs):
        return [configs[c] for c in table[_operand_class(named_args, kwargs)]]

    return triton.autotune(configs=list(configs.values()), key=_KEY, prune_configs_by={"early_config_prune": prune})(
        kernel)


_attn_fwd_tuned = _tuned(_attn_fwd_kernel, _CONFIG_TABLE["fwd"])
_attn_bwd_dkdv_tuned = _tuned(_attn_bwd_dkdv_kernel, _CONFIG_TABLE["dkdv"])
_attn_bwd_dq_tuned = _tuned(_attn_bwd_dq_kernel, _CONFIG_TABLE["dq"])


def split_head_dim(d: int) -> tuple[int, int, bool]:
    """(BLOCK_D, BLOCK_D1, TAIL): the head dim as a power-of-two block plus a smaller tail block.

    The dots need power-of-two widths of at least 16. Rather than pad d to the next power of two
    (72 -> 128: +78% of the QK^T and PV work and registers), d is covered by the largest power of
    two <= d and a tail rounded up to a power of two >= 16 (72 -> 64 + 16, 8 real + 8 masked
    columns; 96 -> 64 + 32), unless the two together are no smaller than the single padded block
    (100 -> 128, 24 -> 32), which then is used alone (TAIL False; BLOCK_D1 is a placeholder).
    """
    whole = max(16, triton.next_power_of_2(d))
    head = max(16, 1 << (d.bit_length() - 1))
    tail = max(16, triton.next_power_of_2(d - head)) if d > head else 0
    if not tail or head + tail >= whole:
        return whole, 16, False
    return head, tail, True


def _meta(q: Tensor, v: Tensor, causal: bool) -> dict:
    d, dv = int(q.shape[-1]), int(v.shape[-1])  # constexprs: specialise on head dims, never on tokens
    fp32_prec = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    (bd, bd1, tail), (bdv, bdv1, tail_v) = split_head_dim(d), split_head_dim(dv)
    return dict(D=d, DV=dv, CAUSAL=causal, DOT_PREC=fp32_prec if q.dtype == torch.float32 else "tf32",
                BLOCK_D=bd, BLOCK_D1=bd1, TAIL=tail, BLOCK_DV=bdv, BLOCK_DV1=bdv1, TAIL_V=tail_v)


def _align(*tensors: Tensor) -> int:
    """The largest power of two (at most 16) dividing every token and head stride of `tensors`."""
    align = 16
    for t in tensors:
        for stride in t.stride()[:-1]:
            stride = int(stride)
            if stride:
                align = min(align, stride & -stride)
    return align


def _check_head_dims(q: Tensor, v: Tensor):
    from . import MAX_ATTENTION_HEAD_DIM
    for name, d in (("head_dim", q.shape[-1]), ("v head_dim", v.shape[-1])):
        if not 1 <= d <= MAX_ATTENTION_HEAD_DIM:
            raise ValueError(f"varlen_attention[triton]: {name} must be in [1, {MAX_ATTENTION_HEAD_DIM}], got {d}")


def _grid(num_tokens: int, block: str, heads: int, num_seqs: int):
    """(work items, heads): an upper bound of the pack's (sequence, tile) items for the tile size the
    autotuner picks (sum of cdiv(len_b, BLOCK) <= cdiv(N, BLOCK) + B), no host read of cu_seqlens."""
    return lambda meta: (triton.cdiv(num_tokens, meta[block]) + num_seqs, heads)


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _check_inputs(op: str, q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int):
    """Shapes and packing metadata the kernels index with; returns the checked (cu_q, cu_k, B)."""
    _check_head_dims(q, v)
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        fail(op, f"q, k, v must be [N, heads, head_dim], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[2] != q.shape[2] or tuple(v.shape[:2]) != tuple(k.shape[:2]):
        fail(op, f"k must be [Nk, Hk, {q.shape[2]}] and v [Nk, Hk, Dv], got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[1] < 1 or q.shape[1] % k.shape[1]:
        fail(op, f"q heads ({q.shape[1]}) must be a positive multiple of k/v heads ({k.shape[1]})")
    for name, t in (("k", k), ("v", v)):
        if t.device != q.device or t.dtype != q.dtype:
            fail(op, f"{name} is {t.dtype} on {t.device} but q is {q.dtype} on {q.device}")
    check_grid(op, (1, q.shape[1]))
    cu_q = checked_cu(op, cu_q, q.shape[0], device=q.device, name="cu_seqlens_q", max_seqlen=max_q,
                      max_name="max_seqlen_q")
    cu_k = checked_cu(op, cu_k, k.shape[0], device=q.device, name="cu_seqlens_k", max_seqlen=max_k,
                      max_name="max_seqlen_k")
    if cu_q.shape != cu_k.shape:
        fail(op, f"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, "
                 f"got {cu_q.shape[0] - 1} and {cu_k.shape[0] - 1}")
    return cu_q, cu_k, cu_q.shape[0] - 1


# ---------------------------------------------------------------------------------------------
# ops
# ---------------------------------------------------------------------------------------------
def varlen_attention_fwd(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                         max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float,
                         causal: bool) -> tuple[Tensor, Tensor]:
    """Returns (out [Nq, H, Dv], lse [H, Nq] fp32: the natural log of each query's softmax normaliser).

    The kernels keep it in base 2 (lse2 = lse * log2(e), the units of their exp2); the contract
    of every backend saves the natural log, converted here and back in the backward."""
    cu_q, cu_k, b = _check_inputs("varlen_attention_fwd", q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                  max_seqlen_k)
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    nq, h, _ = q.shape
    out = q.new_empty((nq, h, v.shape[-1]))
    lse = q.new_empty((h, nq), dtype=torch.float32)
    meta = _meta(q, v, causal)
    meta["ALIGN"] = _align(q, k, v, out)
    # plain assignments, so that torch.library.triton_op's source scan finds every kernel
    kernel = _attn_fwd_kernel if INTERPRETED else _attn_fwd_tuned
    if INTERPRETED:
        meta.update(_INTERPRETER_CONFIG)
    if nq:
        tiles = tile_table(cu_q, TILE_BLOCKS)
        with _common.device_guard(q):
            wrap_triton(kernel)[_grid(nq, "BLOCK_M", h, b)](
                q, k, v, out, lse, cu_q, cu_k, tiles, b, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                v.stride(0), v.stride(1), out.stride(0), out.stride(1), nq, h // k.shape[1], softmax_scale * LOG2E,
                **meta)
    return out, lse * LN2


def varlen_attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                         cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int,
                         softmax_scale: float, causal: bool) -> tuple[Tensor, Tensor, Tensor]:
    op = "varlen_attention_bwd"
    cu_q, cu_k, b = _check_inputs(op, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    out_shape = (q.shape[0], q.shape[1], v.shape[2])
    check_shape(op, out, "out", out_shape)
    check_shape(op, dout, "dout", out_shape)
    check_shape(op, lse, "lse", (q.shape[1], q.shape[0]))
    if lse.dtype != torch.float32:
        fail(op, f"lse must be a float32 tensor, got {lse.dtype}")
    lse = lse * LOG2E  # the base-2 units of the kernels (a new contiguous tensor)
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    dout, out = _last_dim_contiguous(dout), _last_dim_contiguous(out)
    nq, h, _ = q.shape
    hk = k.shape[1]
    dq, dk, dv = q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)
    delta = q.new_empty((h, nq), dtype=torch.float32)
    meta = _meta(q, v, causal)
    meta["ALIGN"] = _align(q, k, v, out, dout, dq, dk, dv)
    block_delta = 128 if INTERPRETED else 16
    dkdv_kernel = _attn_bwd_dkdv_kernel if INTERPRETED else _attn_bwd_dkdv_tuned
    dq_kernel = _attn_bwd_dq_kernel if INTERPRETED else _attn_bwd_dq_tuned
    if INTERPRETED:
        meta.update(_INTERPRETER_CONFIG)
    args = (softmax_scale * LOG2E, softmax_scale)
    with _common.device_guard(q):
        if nq:
            wrap_triton(_attn_delta_kernel)[(triton.cdiv(nq, block_delta), h)](
                out, dout, delta, nq, out.stride(0), out.stride(1), dout.stride(0), dout.stride(1),
                DV=meta["DV"], ALIGN=meta["ALIGN"], BLOCK_M=block_delta,
                BLOCK_DV=max(16, triton.next_power_of_2(meta["DV"])))
        if k.shape[0]:
            tiles_k = tile_table(cu_k, TILE_BLOCKS)
            wrap_triton(dkdv_kernel)[_grid(k.shape[0], "BLOCK_N", hk, b)](
                q, k, v, dout, lse, delta, dk, dv, cu_q, cu_k, tiles_k, b, q.stride(0), q.stride(1),
                k.stride(0), k.stride(1), v.stride(0), v.stride(1), dout.stride(0), dout.stride(1),
                dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), nq, h // hk, *args, **meta)
        if nq:
            tiles_q = tile_table(cu_q, TILE_BLOCKS)
            wrap_triton(dq_kernel)[_grid(nq, "BLOCK_M", h, b)](
                q, k, v, dout, lse, delta, dq, cu_q, cu_k, tiles_q, b, q.stride(0), q.stride(1),
                k.stride(0), k.stride(1), v.stride(0), v.stride(1), dout.stride(0), dout.stride(1),
                dq.stride(0), dq.stride(1), nq, h // hk, *args, **meta)
    return dq, dk, dv


RAW = (varlen_attention_fwd, varlen_attention_bwd)
