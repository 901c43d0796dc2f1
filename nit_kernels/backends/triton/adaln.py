"""Triton kernels of the packed modulation ops: adaln_modulate, gated_residual, residual_adaln.

    adaln_modulate:  h = LN(x) * (1 + scale[seg]) + shift[seg]          LN without affine, eps
    gated_residual:  x_new = x + gate[seg] * y
    residual_adaln:  x_new = x + gate[seg] * y;  h = LN(x_new) * (1 + scale[seg]) + shift[seg]

x, y [N, D]; gate, shift, scale [B, D] (one row per image); math in fp32, outputs in x's dtype.
The row-wise LayerNorm follows the Triton "layer norm" tutorial (statistics of a whole row held
in registers, BLOCK_D = next power of two >= D).

Forward: a program handles a block of rows that may span several images; each row finds its
image by a binary search of cu_seqlens and gathers that image's gate/shift/scale row.

Backward: the per-image gradients (dgate, dshift, dscale) are sums over the image's rows, so the
backward walks segment-aligned tiles (never two images in one tile, see segment_tiles). Each tile
produces its partial sums, which are then either
  - written to a [tiles, D] buffer and summed per image in a fixed order by a second kernel:
    bitwise repeatable; used when torch.are_deterministic_algorithms_enabled(), or
  - added into a fp32 [B, D] accumulator with atomics (one add per tile and column): faster,
    but the order of the adds, hence the last bits, can change between runs on a GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common
from ._checks import check_device, check_shape, checked_cu, fail
from ._common import (INTERPRETED, cast_to, num_warps_for, rows_per_program, segment_of,
                      segment_of_scalar, segment_tiles, wrap_triton)

Tensor = torch.Tensor

# rows of one backward tile on a GPU (its partial sums are one [D] row per tile and reduced slot)
_GPU_TILE_ROWS = 32


@triton.jit
def _modulate_fwd_kernel(x_ptr, y_ptr, gate_ptr, shift_ptr, scale_ptr, xo_ptr, h_ptr, mean_ptr, rstd_ptr, cu_ptr,
                         N, D, B, eps,
                         RESIDUAL: tl.constexpr, NORM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows < N)[:, None] & (cols < D)[None, :]
    seg = segment_of(cu_ptr, rows, B)
    offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
    per_image = seg.to(tl.int64)[:, None] * D + cols[None, :]  # gather of the image's row
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if RESIDUAL:
        y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(gate_ptr + per_image, mask=mask, other=0.0).to(tl.float32)
        x = x + g * y
        tl.store(xo_ptr + offs, cast_to(x, xo_ptr), mask=mask)
    if NORM:
        # the LayerNorm reads the fp32 x_new, before it is rounded to the output dtype
        mean = tl.sum(x, axis=1) / D
        xc = tl.where(mask, x - mean[:, None], 0.0)
        rstd = tl.rsqrt(tl.sum(xc * xc, axis=1) / D + eps)
        sh = tl.load(shift_ptr + per_image, mask=mask, other=0.0).to(tl.float32)
        sc = tl.load(scale_ptr + per_image, mask=mask, other=0.0).to(tl.float32)
        h = xc * rstd[:, None] * (1.0 + sc) + sh
        tl.store(h_ptr + offs, cast_to(h, h_ptr), mask=mask)
        tl.store(mean_ptr + rows, mean, mask=rows < N)
        tl.store(rstd_ptr + rows, rstd, mask=rows < N)


@triton.jit
def _emit(part_ptr, slot_stride, slot, row, D, cols, vals, ATOMIC: tl.constexpr):
    """Partial per-image sum `vals` [BLOCK_D] of one tile: stored in its own row, or atomically added."""
    ptrs = part_ptr + slot * slot_stride + row.to(tl.int64) * D + cols
    if ATOMIC:
        tl.atomic_add(ptrs, vals, mask=cols < D, sem="relaxed")
    else:
        tl.store(ptrs, vals, mask=cols < D)


@triton.jit
def _modulate_bwd_kernel(dh_ptr, dxo_ptr, x_ptr, y_ptr, gate_ptr, scale_ptr, mean_ptr, rstd_ptr,
                         dx_ptr, dy_ptr, part_ptr, cu_ptr, tile_cu_ptr,
                         D, B, slot_stride, tile_rows,
                         RESIDUAL: tl.constexpr, NORM: tl.constexpr, ATOMIC: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """One segment-aligned tile of `tile_rows` rows, walked in chunks of BLOCK_M rows.

    With h = xhat * (1 + scale) + shift, xhat = (x - mean) * rstd:
        dshift = sum dh,  dscale = sum dh * xhat,
        dx_ln = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)),  dxhat = dh * (1 + scale)
    and with x_new = x + gate * y, g = dx_new + dx_ln:  dx = g, dy = gate * g, dgate = sum g * y.
    Reduced slots, in order: dgate (RESIDUAL), then dshift and dscale (NORM).
    """
    pid = tl.program_id(0)
    b = segment_of_scalar(tile_cu_ptr, pid, B)
    live = pid < tl.load(tile_cu_ptr + B)  # the grid has surplus programs (an upper bound of tiles)
    start = tl.load(cu_ptr + b) + (pid - tl.load(tile_cu_ptr + b)) * tile_rows
    end = tl.minimum(tl.load(cu_ptr + b + 1), start + tile_rows)
    end = tl.where(live, end, start)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    per_image = b.to(tl.int64) * D + cols
    if RESIDUAL:
        g = tl.load(gate_ptr + per_image, mask=col_ok, other=0.0).to(tl.float32)
        dgate = tl.zeros([BLOCK_D], dtype=tl.float32)
    if NORM:
        one_sc = 1.0 + tl.load(scale_ptr + per_image, mask=col_ok, other=0.0).to(tl.float32)
        dshift = tl.zeros([BLOCK_D], dtype=tl.float32)
        dscale = tl.zeros([BLOCK_D], dtype=tl.float32)
    for r0 in range(start, end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_ok = rows < end
        mask = row_ok[:, None] & col_ok[None, :]
        offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
        if RESIDUAL:
            y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            dx = tl.load(dxo_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if NORM:
            dh = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            if RESIDUAL:
                x = x + g[None, :] * y  # recomputed in fp32: the statistics were taken of this value
            mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
            rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
            xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
            dxhat = dh * one_sc[None, :]
            c1 = tl.sum(dxhat * xhat, axis=1) / D
            c2 = tl.sum(dxhat, axis=1) / D
            dx_ln = rstd[:, None] * (dxhat - c2[:, None] - xhat * c1[:, None])
            dshift += tl.sum(dh, axis=0)
            dscale += tl.sum(dh * xhat, axis=0)
            if RESIDUAL:
                dx = dx + dx_ln
            else:
                dx = dx_ln
            tl.store(dx_ptr + offs, cast_to(dx, dx_ptr), mask=mask)
        if RESIDUAL:
            dgate += tl.sum(tl.where(mask, dx * y, 0.0), axis=0)
            tl.store(dy_ptr + offs, cast_to(g[None, :] * dx, dy_ptr), mask=mask)
    row = b if ATOMIC else pid
    if RESIDUAL:
        _emit(part_ptr, slot_stride, 0, row, D, cols, dgate, ATOMIC)
    if NORM:
        first = 1 if RESIDUAL else 0
        _emit(part_ptr, slot_stride, first, row, D, cols, dshift, ATOMIC)
        _emit(part_ptr, slot_stride, first + 1, row, D, cols, dscale, ATOMIC)


@triton.jit
def _segment_sum_kernel(part_ptr, out_ptr, tile_cu_ptr, D, in_slot_stride, out_slot_stride, BLOCK_D: tl.constexpr):
    """out[k, b] = sum of part[k, t] over image b's tiles t, in tile order (deterministic)."""
    b = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    slot = tl.program_id(2)
    t0 = tl.load(tile_cu_ptr + b)
    t1 = tl.load(tile_cu_ptr + b + 1)
    ptrs = part_ptr + slot * in_slot_stride + t0.to(tl.int64) * D + cols
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for _ in range(t0, t1):
        acc += tl.load(ptrs, mask=cols < D, other=0.0)
        ptrs += D
    tl.store(out_ptr + slot * out_slot_stride + b.to(tl.int64) * D + cols, cast_to(acc, out_ptr), mask=cols < D)


# ---------------------------------------------------------------------------------------------
# launchers (make_fx-traceable: shapes and Python scalars only, no reads of device values)
# ---------------------------------------------------------------------------------------------
def _dense(*ts):
    """Row-major copies where needed: the kernels index [rows, D] tensors as rows * D + column."""
    return [None if t is None else t.contiguous() for t in ts]


def _new(t: Tensor) -> Tensor:
    return t.new_empty(t.shape)  # contiguous, like _dense's outputs (empty_like would keep odd strides)


def _check(op: str, ref: Tensor, cu: Tensor, rows: dict, per_image: dict, stats: dict = {}) -> Tensor:
    """Shapes, devices and packing metadata the kernels index with; returns the checked cu_seqlens.

    ref [N, D]; rows: other [N, D] tensors; per_image: [B, D] tensors; stats: fp32 [N] tensors.
    """
    if ref.dim() != 2:
        fail(op, f"the rows must be a 2-D tensor [N, D], got shape {tuple(ref.shape)}")
    n, d = ref.shape
    cu = checked_cu(op, cu, n, device=ref.device)
    b = cu.shape[0] - 1
    for group, shape in ((rows, (n, d)), (per_image, (b, d)), (stats, (n,))):
        for name, t in group.items():
            if t is not None:
                check_shape(op, t, name, shape)
                check_device(op, ref.device, **{name: t})
    for name, t in stats.items():
        if t is not None and t.dtype != torch.float32:
            fail(op, f"{name} must be float32, got {t.dtype}")
    return cu


def _fwd(x: Tensor, y, gate, shift, scale, cu: Tensor, eps: float, residual: bool, norm: bool):
    op = "residual_adaln_fwd" if residual and norm else "gated_residual_fwd" if residual else "adaln_modulate_fwd"
    cu = _check(op, x, cu, {"y": y}, {"gate": gate, "shift": shift, "scale": scale})
    x, y, gate, shift, scale = _dense(x, y, gate, shift, scale)
    n, d = x.shape
    b = cu.shape[0] - 1
    block_d = triton.next_power_of_2(int(d))  # a compile-time size: specialise on D, never on N or B
    block_m = rows_per_program(block_d)
    x_new = _new(x) if residual else x
    h = _new(x) if norm else x
    mean = x.new_empty(n if norm else 1, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    if n:
        with _common.device_guard(x):
            wrap_triton(_modulate_fwd_kernel)[(triton.cdiv(n, block_m),)](
                x, y if residual else x, gate if residual else x, shift if norm else x, scale if norm else x,
                x_new, h, mean, rstd, cu, n, d, b, eps,
                RESIDUAL=residual, NORM=norm, BLOCK_M=block_m, BLOCK_D=block_d,
                num_warps=num_warps_for(block_m * block_d))
    return x_new, h, mean, rstd


def _bwd(dh, dxo, x, y, gate, scale, mean, rstd, cu: Tensor, residual: bool, norm: bool):
    """Returns (dx or None, dy or None, sums [slots, B, D] in x's dtype: dgate?, dshift?, dscale?)."""
    op = "residual_adaln_bwd" if residual and norm else "gated_residual_bwd" if residual else "adaln_modulate_bwd"
    cu = _check(op, dh if norm else dxo, cu, {"dx_new": dxo if norm else None, "x": x, "y": y},
                {"gate": gate, "scale": scale}, {"mean": mean, "rstd": rstd})
    dh, dxo, x, y, gate, scale = _dense(dh, dxo, x, y, gate, scale)
    ref = dh if norm else dxo
    n, d = ref.shape
    b = cu.shape[0] - 1
    block_d = triton.next_power_of_2(int(d))  # a compile-time size: specialise on D, never on N or B
    block_m = rows_per_program(block_d, gpu_elems=2048)  # ~8 live [rows, D] tiles: keep them in registers
    tile_rows = block_m if INTERPRETED else max(block_m, _GPU_TILE_ROWS)
    tile_cu, max_tiles = segment_tiles(cu, n, tile_rows)
    slots = int(residual) + 2 * int(norm)
    deterministic = torch.are_deterministic_algorithms_enabled()
    part = ref.new_empty if deterministic else ref.new_zeros
    part = part((slots, max_tiles if deterministic else b, d), dtype=torch.float32)
    dx = _new(ref) if norm else None
    dy = _new(ref) if residual else None
    with _common.device_guard(ref):
        if n:
            wrap_triton(_modulate_bwd_kernel)[(max_tiles,)](
                dh if norm else ref, dxo if residual else ref, x if norm else ref, y if residual else ref,
                gate if residual else ref, scale if norm else ref, mean, rstd,
                dx if norm else ref, dy if residual else ref, part, cu, tile_cu,
                d, b, part.stride(0), tile_rows,
                RESIDUAL=residual, NORM=norm, ATOMIC=not deterministic, BLOCK_M=block_m, BLOCK_D=block_d,
                num_warps=num_warps_for(2 * block_m * block_d))
        if not deterministic:
            return dx, dy, part.to(ref.dtype)
        sums = ref.new_empty((slots, b, d))
        block_r = min(block_d, 1024) if not INTERPRETED else block_d
        # images on grid axis 0 (up to 2**31 - 1), column blocks and slots on the small axes
        wrap_triton(_segment_sum_kernel)[(b, triton.cdiv(d, block_r), slots)](
            part, sums, tile_cu, d, part.stride(0), sums.stride(0), BLOCK_D=block_r)
    return dx, dy, sums


# ---------------------------------------------------------------------------------------------
# raw functions of the op contracts (nit_kernels/_autograd.py), registered as nit_triton::<name>
# ---------------------------------------------------------------------------------------------
def _split(sums: Tensor) -> tuple[Tensor, ...]:
    # one [B, D] tensor per per-image gradient: outputs of a torch.library op may not alias each
    # other (the kernels write them as one [slots, B, D] buffer; B x D is small next to N x D)
    return tuple(s.clone() for s in sums.unbind(0))


def adaln_modulate_fwd(x: Tensor, shift: Tensor, scale: Tensor, cu_seqlens: Tensor,
                       eps: float) -> tuple[Tensor, Tensor, Tensor]:
    _, h, mean, rstd = _fwd(x, None, None, shift, scale, cu_seqlens, eps, residual=False, norm=True)
    return h, mean, rstd


def adaln_modulate_bwd(dy: Tensor, x: Tensor, scale: Tensor, mean: Tensor, rstd: Tensor,
                       cu_seqlens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    dx, _, sums = _bwd(dy, None, x, None, None, scale, mean, rstd, cu_seqlens, residual=False, norm=True)
    return (dx, *_split(sums))


def gated_residual_fwd(x: Tensor, y: Tensor, gate: Tensor, cu_seqlens: Tensor) -> Tensor:
    return _fwd(x, y, gate, None, None, cu_seqlens, 0.0, residual=True, norm=False)[0]


def gated_residual_bwd(dout: Tensor, y: Tensor, gate: Tensor, cu_seqlens: Tensor) -> tuple[Tensor, Tensor]:
    _, dy, sums = _bwd(None, dout, None, y, gate, None, None, None, cu_seqlens, residual=True, norm=False)
    return (dy, *_split(sums))


def residual_adaln_fwd(x: Tensor, y: Tensor, gate: Tensor, shift: Tensor, scale: Tensor, cu_seqlens: Tensor,
                       eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _fwd(x, y, gate, shift, scale, cu_seqlens, eps, residual=True, norm=True)


def residual_adaln_bwd(dx_new: Tensor, dh: Tensor, x: Tensor, y: Tensor, gate: Tensor, scale: Tensor, mean: Tensor,
                       rstd: Tensor, cu_seqlens: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    dx, dy, sums = _bwd(dh, dx_new, x, y, gate, scale, mean, rstd, cu_seqlens, residual=True, norm=True)
    return (dx, dy, *_split(sums))


RAW = (adaln_modulate_fwd, adaln_modulate_bwd, gated_residual_fwd, gated_residual_bwd, residual_adaln_fwd,
       residual_adaln_bwd)
