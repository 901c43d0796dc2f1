"""Triton kernels of the axial 2D RoPE ops: rope_2d and qk_norm_rope (LayerNorm + RoPE).

q [N, H, Dh], k [N, Hk, Dh]; Dh % 4 == 0. Token t of an image (its index inside the image) has
positions  grid: p0 = t % w, p1 = t // w;  official: p0 = t % h, p1 = t // h.
Pair i of the Dh/2 interleaved pairs (2i, 2i+1) rotates by angle p * freqs_flat[i], where
freqs_flat is the [2, Dh/4] table read row by row, p = p0 for the first Dh/4 pairs and p1 for
the rest:  (x0, x1) -> mscale * (x0 cos - x1 sin, x1 cos + x0 sin).
qk_norm_rope first applies LayerNorm over Dh with affine (weight, bias [Dh], eps) per head.

One launch handles q and k: program (i, j) takes a block of tokens, computes their positions
(binary search of cu_seqlens) and the cos/sin of every pair once, then rotates a group of heads:
groups j < cdiv(H, heads) are q's, the rest k's. No per-token cos/sin table exists in memory.
The backward of a rotation by mscale*R is mscale*R^T, the same kernel with the sine negated;
qk_norm_rope's backward rotates back, then runs the LayerNorm backward and sums dweight and
dbias per program (a fixed-order torch sum of those partials follows: deterministic).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...packed import POSITIONS
from . import _common
from ._checks import check_device, check_grid, check_shape, checked_cu, fail
from ._common import (INTERPRETED, cast_to, num_warps_for, rows_per_program, segment_of,
                      wrap_triton)

Tensor = torch.Tensor

_GPU_HEADS_PER_PROGRAM = 4


@triton.jit
def _cos_sin(cu_ptr, sizes_ptr, freqs_ptr, rows, B, NP, mscale, sign,
             POS_COL: tl.constexpr, BLOCK_P: tl.constexpr):
    """mscale * cos and sign * mscale * sin [BLOCK_T, BLOCK_P] of every token's pairs."""
    seg = segment_of(cu_ptr, rows, B)
    t = rows - tl.load(cu_ptr + seg)
    m = tl.load(sizes_ptr + seg * 2 + POS_COL)  # w (grid) or h (official): the fast axis's modulus
    p0 = t % m
    p1 = t // m
    i = tl.arange(0, BLOCK_P)
    f = tl.load(freqs_ptr + i, mask=i < NP, other=0.0)
    pos = tl.where(i[None, :] < NP // 2, p0[:, None], p1[:, None]).to(tl.float32)
    angle = pos * f[None, :]
    return tl.cos(angle) * mscale, tl.sin(angle) * (mscale * sign)


@triton.jit
def _load_pairs(ptr, rows, h, s_t, s_h, mask, BLOCK_P: tl.constexpr):
    """Even and odd elements (x0, x1) [BLOCK_T, BLOCK_P] of head h of every row, in fp32."""
    base = ptr + rows.to(tl.int64)[:, None] * s_t + h * s_h + 2 * tl.arange(0, BLOCK_P)[None, :]
    return (tl.load(base, mask=mask, other=0.0).to(tl.float32),
            tl.load(base + 1, mask=mask, other=0.0).to(tl.float32))


@triton.jit
def _store_pairs(ptr, rows, h, s_t, s_h, v0, v1, mask, BLOCK_P: tl.constexpr):
    base = ptr + rows.to(tl.int64)[:, None] * s_t + h * s_h + 2 * tl.arange(0, BLOCK_P)[None, :]
    tl.store(base, cast_to(v0, ptr), mask=mask)
    tl.store(base + 1, cast_to(v1, ptr), mask=mask)


@triton.jit
def _fwd_heads(x_ptr, o_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, rows, row_ok, h0, h1, nheads, s_t, s_h, cos, sin, NP,
               eps,
               NORM: tl.constexpr, BLOCK_P: tl.constexpr):
    i = tl.arange(0, BLOCK_P)
    pair_ok = i < NP
    mask = row_ok[:, None] & pair_ok[None, :]
    if NORM:
        w0 = tl.load(w_ptr + 2 * i, mask=pair_ok, other=0.0)[None, :]
        w1 = tl.load(w_ptr + 2 * i + 1, mask=pair_ok, other=0.0)[None, :]
        b0 = tl.load(b_ptr + 2 * i, mask=pair_ok, other=0.0)[None, :]
        b1 = tl.load(b_ptr + 2 * i + 1, mask=pair_ok, other=0.0)[None, :]
    for h in range(h0, h1):
        x0, x1 = _load_pairs(x_ptr, rows, h, s_t, s_h, mask, BLOCK_P)
        if NORM:
            mean = (tl.sum(x0, axis=1) + tl.sum(x1, axis=1)) / (2 * NP)
            x0 = tl.where(mask, x0 - mean[:, None], 0.0)
            x1 = tl.where(mask, x1 - mean[:, None], 0.0)
            rstd = tl.rsqrt((tl.sum(x0 * x0, axis=1) + tl.sum(x1 * x1, axis=1)) / (2 * NP) + eps)
            x0 = x0 * rstd[:, None] * w0 + b0
            x1 = x1 * rstd[:, None] * w1 + b1
            stat = rows.to(tl.int64) * nheads + h  # [N, heads]; int64: N*H may pass 2**31
            tl.store(mean_ptr + stat, mean, mask=row_ok)
            tl.store(rstd_ptr + stat, rstd, mask=row_ok)
        _store_pairs(o_ptr, rows, h, nheads * 2 * NP, 2 * NP, x0 * cos - x1 * sin, x1 * cos + x0 * sin, mask, BLOCK_P)


@triton.jit
def _rope_fwd_kernel(q_ptr, k_ptr, qo_ptr, ko_ptr, qw_ptr, qb_ptr, kw_ptr, kb_ptr, qmean_ptr, qrstd_ptr, kmean_ptr,
                     krstd_ptr, cu_ptr, sizes_ptr, freqs_ptr, N, H, HK, B, sq_t, sq_h, sk_t, sk_h, NP, eps, mscale,
                     sign,
                     heads_per_prog, POS_COL: tl.constexpr, NORM: tl.constexpr,
                     BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < N
    cos, sin = _cos_sin(cu_ptr, sizes_ptr, freqs_ptr, rows, B, NP, mscale, sign, POS_COL, BLOCK_P)
    j = tl.program_id(1)
    q_groups = tl.cdiv(H, heads_per_prog)
    if j < q_groups:
        h0 = j * heads_per_prog
        _fwd_heads(q_ptr, qo_ptr, qw_ptr, qb_ptr, qmean_ptr, qrstd_ptr, rows, row_ok, h0,
                   tl.minimum(h0 + heads_per_prog, H), H, sq_t, sq_h, cos, sin, NP, eps, NORM, BLOCK_P)
    else:
        h0 = (j - q_groups) * heads_per_prog
        _fwd_heads(k_ptr, ko_ptr, kw_ptr, kb_ptr, kmean_ptr, krstd_ptr, rows, row_ok, h0,
                   tl.minimum(h0 + heads_per_prog, HK), HK, sk_t, sk_h, cos, sin, NP, eps, NORM, BLOCK_P)


@triton.jit
def _norm_bwd_heads(g_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, part_ptr, rows, row_ok, h0, h1, nheads, s_t, s_h,
                    cos, sin, NP, BLOCK_P: tl.constexpr):
    """LayerNorm(affine) + rotation backward of heads h0..h1-1; dweight/dbias partials to part [2, 2*NP].

    With n = xhat * w + b rotated to o:  dn = R^T do;  dw = sum dn * xhat;  db = sum dn;
    dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)),  dxhat = dn * w.
    """
    i = tl.arange(0, BLOCK_P)
    pair_ok = i < NP
    mask = row_ok[:, None] & pair_ok[None, :]
    w0 = tl.load(w_ptr + 2 * i, mask=pair_ok, other=0.0)[None, :]
    w1 = tl.load(w_ptr + 2 * i + 1, mask=pair_ok, other=0.0)[None, :]
    dw0 = tl.zeros([BLOCK_P], dtype=tl.float32)
    dw1 = tl.zeros([BLOCK_P], dtype=tl.float32)
    db0 = tl.zeros([BLOCK_P], dtype=tl.float32)
    db1 = tl.zeros([BLOCK_P], dtype=tl.float32)
    dh = 2 * NP
    for h in range(h0, h1):
        g0, g1 = _load_pairs(g_ptr, rows, h, nheads * dh, dh, mask, BLOCK_P)
        dn0 = g0 * cos + g1 * sin  # the transposed rotation
        dn1 = g1 * cos - g0 * sin
        x0, x1 = _load_pairs(x_ptr, rows, h, s_t, s_h, mask, BLOCK_P)
        stat = rows.to(tl.int64) * nheads + h
        mean = tl.load(mean_ptr + stat, mask=row_ok, other=0.0)[:, None]
        rstd = tl.load(rstd_ptr + stat, mask=row_ok, other=0.0)[:, None]
        xh0 = tl.where(mask, (x0 - mean) * rstd, 0.0)
        xh1 = tl.where(mask, (x1 - mean) * rstd, 0.0)
        dw0 += tl.sum(dn0 * xh0, axis=0)
        dw1 += tl.sum(dn1 * xh1, axis=0)
        db0 += tl.sum(dn0, axis=0)
        db1 += tl.sum(dn1, axis=0)
        dxh0 = dn0 * w0
        dxh1 = dn1 * w1
        c1 = ((tl.sum(dxh0 * xh0, axis=1) + tl.sum(dxh1 * xh1, axis=1)) / dh)[:, None]
        c2 = ((tl.sum(dxh0, axis=1) + tl.sum(dxh1, axis=1)) / dh)[:, None]
        _store_pairs(dx_ptr, rows, h, nheads * dh, dh, rstd * (dxh0 - c2 - xh0 * c1), rstd * (dxh1 - c2 - xh1 * c1),
                     mask, BLOCK_P)
    tl.store(part_ptr + 2 * i, dw0, mask=pair_ok)
    tl.store(part_ptr + 2 * i + 1, dw1, mask=pair_ok)
    tl.store(part_ptr + dh + 2 * i, db0, mask=pair_ok)
    tl.store(part_ptr + dh + 2 * i + 1, db1, mask=pair_ok)


@triton.jit
def _qk_norm_bwd_kernel(gq_ptr, gk_ptr, q_ptr, k_ptr, qw_ptr, kw_ptr, qmean_ptr, qrstd_ptr, kmean_ptr, krstd_ptr,
                        dq_ptr, dk_ptr, part_ptr, cu_ptr, sizes_ptr, freqs_ptr, N, H, HK, B, sq_t, sq_h, sk_t, sk_h,
                        NP, mscale,
                        heads_per_prog, POS_COL: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < N
    cos, sin = _cos_sin(cu_ptr, sizes_ptr, freqs_ptr, rows, B, NP, mscale, 1.0, POS_COL, BLOCK_P)
    j = tl.program_id(1)
    part = part_ptr + (j * tl.num_programs(0) + tl.program_id(0)).to(tl.int64) * (4 * NP)  # [groups, blocks, 2, Dh]
    q_groups = tl.cdiv(H, heads_per_prog)
    if j < q_groups:
        h0 = j * heads_per_prog
        _norm_bwd_heads(gq_ptr, q_ptr, qw_ptr, qmean_ptr, qrstd_ptr, dq_ptr, part, rows, row_ok, h0,
                        tl.minimum(h0 + heads_per_prog, H), H, sq_t, sq_h, cos, sin, NP, BLOCK_P)
    else:
        h0 = (j - q_groups) * heads_per_prog
        _norm_bwd_heads(gk_ptr, k_ptr, kw_ptr, kmean_ptr, krstd_ptr, dk_ptr, part, rows, row_ok, h0,
                        tl.minimum(h0 + heads_per_prog, HK), HK, sk_t, sk_h, cos, sin, NP, BLOCK_P)


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------
def _pos_col(positions: str) -> int:
    if positions not in POSITIONS:
        raise ValueError(f"positions must be 'grid' or 'official', got {positions!r}")
    return 1 if positions == "grid" else 0  # sizes[:, 1] = w for grid, sizes[:, 0] = h for official


def _check(op: str, q: Tensor, k: Tensor, cu: Tensor, sizes: Tensor, freqs: Tensor, **shaped) -> Tensor:
    """Shapes, devices and packing metadata the kernels index with; returns the checked cu_seqlens.

    shaped: name=(tensor, expected shape) of the other tensor arguments.
    """
    if q.dim() != 3 or k.dim() != 3 or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        fail(op, f"q must be [N, H, Dh] and k [N, Hk, Dh], got {tuple(q.shape)} and {tuple(k.shape)}")
    n, h, dh = q.shape
    if dh % 4:
        fail(op, f"head_dim must be a multiple of 4, got {dh}")
    check_device(op, q.device, k=k, freqs=freqs)
    if freqs.dtype != torch.float32 or tuple(freqs.shape) != (2, dh // 4) or not freqs.is_contiguous():
        fail(op, f"freqs must be a contiguous float32 tensor [2, {dh // 4}], got {freqs.dtype} {tuple(freqs.shape)}")
    for name, (t, shape) in shaped.items():
        check_shape(op, t, name, shape)
        check_device(op, q.device, **{name: t})
    return checked_cu(op, cu, n, device=q.device, sizes=sizes)


def _tiling(q: Tensor, k: Tensor, gpu_elems: int):
    """Token block, heads per program and grid; gpu_elems sizes a [tokens, Dh/2] tile so that the
    ~10 live tiles (x0, x1, cos, sin, ...) of a program stay in registers (compile_check reports)."""
    n, h, dh = q.shape
    block_p = triton.next_power_of_2(max(int(dh) // 2, 1))  # compile-time: specialise on Dh only
    block_t = rows_per_program(block_p, gpu_elems=gpu_elems, max_rows=64 if not INTERPRETED else 512)
    hpp = max(h, k.shape[1]) if INTERPRETED else _GPU_HEADS_PER_PROGRAM
    grid = (triton.cdiv(n, block_t), triton.cdiv(h, hpp) + triton.cdiv(k.shape[1], hpp))
    check_grid("rope", grid, ("token blocks", "head groups"))
    return block_p, block_t, hpp, grid


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def rope_2d(q: Tensor, k: Tensor, cu_seqlens: Tensor, sizes: Tensor, freqs: Tensor, positions: str,
               mscale: float, inverse: bool) -> tuple[Tensor, Tensor]:
    cu_seqlens = _check("rope_2d", q, k, cu_seqlens, sizes, freqs)
    q, k = _last_dim_contiguous(q), _last_dim_contiguous(k)
    n, h, dh = q.shape
    b = cu_seqlens.shape[0] - 1
    qo, ko = q.new_empty(q.shape), k.new_empty(k.shape)
    block_p, block_t, hpp, grid = _tiling(q, k, gpu_elems=1024)
    if n:
        with _common.device_guard(q):
            wrap_triton(_rope_fwd_kernel)[grid](
                q, k, qo, ko, freqs, freqs, freqs, freqs, qo, qo, ko, ko, cu_seqlens, sizes, freqs,
                n, h, k.shape[1], b, q.stride(0), q.stride(1), k.stride(0), k.stride(1), dh // 2,
                0.0, mscale, -1.0 if inverse else 1.0, hpp,
                POS_COL=_pos_col(positions), NORM=False, BLOCK_T=block_t, BLOCK_P=block_p,
                num_warps=num_warps_for(block_t * block_p))
    return qo, ko


def qk_norm_rope_fwd(q: Tensor, k: Tensor, cu_seqlens: Tensor, sizes: Tensor, freqs: Tensor, q_weight: Tensor,
                     q_bias: Tensor, k_weight: Tensor, k_bias: Tensor, eps: float, positions: str,
                     mscale: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (q_rot, k_rot, q_mean, q_rstd [N, H], k_mean, k_rstd [N, Hk]); statistics are fp32."""
    dh = (q.shape[-1],)
    cu_seqlens = _check("qk_norm_rope_fwd", q, k, cu_seqlens, sizes, freqs, q_weight=(q_weight, dh),
                        q_bias=(q_bias, dh), k_weight=(k_weight, dh), k_bias=(k_bias, dh))
    q, k = _last_dim_contiguous(q), _last_dim_contiguous(k)
    n, h, dh = q.shape
    hk = k.shape[1]
    b = cu_seqlens.shape[0] - 1
    qo, ko = q.new_empty(q.shape), k.new_empty(k.shape)
    stats = [t.new_empty((n, heads), dtype=torch.float32) for t, heads in ((q, h), (q, h), (k, hk), (k, hk))]
    block_p, block_t, hpp, grid = _tiling(q, k, gpu_elems=1024)
    if n:
        with _common.device_guard(q):
            wrap_triton(_rope_fwd_kernel)[grid](
                q, k, qo, ko, q_weight, q_bias, k_weight, k_bias, *stats, cu_seqlens, sizes, freqs,
                n, h, hk, b, q.stride(0), q.stride(1), k.stride(0), k.stride(1), dh // 2,
                eps, mscale, 1.0, hpp,
                POS_COL=_pos_col(positions), NORM=True, BLOCK_T=block_t, BLOCK_P=block_p,
                num_warps=num_warps_for(block_t * block_p))
    return (qo, ko, *stats)


def qk_norm_rope_bwd(dq_rot: Tensor, dk_rot: Tensor, q: Tensor, k: Tensor, cu_seqlens: Tensor, sizes: Tensor,
                     freqs: Tensor, q_weight: Tensor, k_weight: Tensor, q_mean: Tensor, q_rstd: Tensor, k_mean: Tensor,
                     k_rstd: Tensor, positions: str,
                     mscale: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (dq, dk, dq_weight, dq_bias, dk_weight, dk_bias); the parameter gradients in q_weight's dtype."""
    dh, qs, ks = (q.shape[-1],), tuple(q.shape[:2]), tuple(k.shape[:2])
    cu_seqlens = _check("qk_norm_rope_bwd", q, k, cu_seqlens, sizes, freqs, dq_rot=(dq_rot, q.shape),
                        dk_rot=(dk_rot, k.shape), q_weight=(q_weight, dh), k_weight=(k_weight, dh),
                        q_mean=(q_mean, qs), q_rstd=(q_rstd, qs), k_mean=(k_mean, ks), k_rstd=(k_rstd, ks))
    stats = [t.contiguous() for t in (q_mean, q_rstd, k_mean, k_rstd)]
    if any(t.dtype != torch.float32 for t in stats):
        fail("qk_norm_rope_bwd", f"q_mean, q_rstd, k_mean, k_rstd must be float32, got {[t.dtype for t in stats]}")
    q, k = _last_dim_contiguous(q), _last_dim_contiguous(k)
    dq_rot, dk_rot = dq_rot.contiguous(), dk_rot.contiguous()
    n, h, dh = q.shape
    hk = k.shape[1]
    b = cu_seqlens.shape[0] - 1
    dq, dk = q.new_empty(q.shape), k.new_empty(k.shape)
    block_p, block_t, hpp, grid = _tiling(q, k, gpu_elems=512)
    q_groups = triton.cdiv(h, hpp)
    part = q.new_zeros((grid[1], grid[0], 2, dh), dtype=torch.float32)
    if n:
        with _common.device_guard(q):
            wrap_triton(_qk_norm_bwd_kernel)[grid](
                dq_rot, dk_rot, q, k, q_weight, k_weight, *stats, dq, dk, part, cu_seqlens, sizes, freqs,
                n, h, hk, b, q.stride(0), q.stride(1), k.stride(0), k.stride(1), dh // 2, mscale, hpp,
                POS_COL=_pos_col(positions), BLOCK_T=block_t, BLOCK_P=block_p,
                num_warps=num_warps_for(block_t * block_p))
    # fixed-order sums of the per-program partials [groups, blocks, (dweight, dbias), Dh]
    sums = [part[groups, :, i].sum((0, 1)).to(w.dtype) for groups, w in ((slice(None, q_groups), q_weight),
                                                                          (slice(q_groups, None), k_weight))
            for i in (0, 1)]
    return (dq, dk, *sums)


RAW = (rope_2d, qk_norm_rope_fwd, qk_norm_rope_bwd)
