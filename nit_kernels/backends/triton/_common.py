"""Pieces shared by the Triton kernels: segment search, segment-aligned tiles, launch helpers.

Whether kernels run compiled (GPU) or interpreted (CPU, ``TRITON_INTERPRET=1``) is fixed when
``@triton.jit`` decorates them, i.e. when this package is first imported; ``INTERPRETED`` records
that decision so the registration and the refusals agree with what the kernels can do.
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

try:
    from triton import knobs as _knobs
    INTERPRETED: bool = bool(_knobs.runtime.interpret)  # the switch @triton.jit reads
except (ImportError, AttributeError):  # older triton: the environment variable itself
    INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

_wrap = getattr(torch.library, "wrap_triton", None) or getattr(torch.library, "capture_triton", None)


def wrap_triton(kernel):
    """torch.library.wrap_triton where it exists (a plain launch in eager, a graph node when traced)."""
    return kernel if _wrap is None else _wrap(kernel)


# A triton_op exposes its kernels to torch.compile, which then traces the Python launcher with fake
# tensors; the interpreter cannot launch on fake tensors ("Cannot access data pointer"), so under
# the interpreter each op is an opaque custom_op with an explicit fake kernel instead.
USE_TRITON_OP: bool = not INTERPRETED and hasattr(torch.library, "triton_op")


def device_guard(t: torch.Tensor):
    """Launch context of `t`'s device: Triton launches on the current device and its current stream,
    so a kernel on tensors of cuda:1 while cuda:0 is current must run under torch.cuda.device(1)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


_ROUND_BF16_BY_BITS = tl.constexpr(INTERPRETED)


@triton.jit
def cast_to(x, ptr):
    """fp32 `x` cast to the element type of `ptr`, rounding to nearest even.

    A GPU's fp32 -> bf16 conversion rounds to nearest even; the interpreter's truncates (up to one
    ulp off), so under the interpreter bf16 is rounded by hand on the fp32 bits first (exact for
    finite values; the truncating cast of an already rounded value is then exact).
    """
    if _ROUND_BF16_BY_BITS:
        if ptr.dtype.element_ty == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(ptr.dtype.element_ty)


@triton.jit
def segment_of(cu_ptr, idx, num_segments):
    """Largest b in [0, num_segments) with cu[b] <= idx, for every index of a block.

    cu is non-decreasing with cu[0] = 0, so empty segments are skipped. The bisection runs until
    every interval is one wide, so the number of segments needs no compile-time bound (a count
    of halvings passed from the host would specialise compiled graphs on the number of images);
    every load stays in [0, num_segments) because mid < hi while hi - lo >= 2.
    """
    lo = idx * 0
    hi = lo + num_segments
    while tl.max(hi - lo, axis=0) > 1:
        mid = (lo + hi) // 2
        go = tl.load(cu_ptr + mid) <= idx
        lo = tl.where(go, mid, lo)
        hi = tl.where(go, hi, mid)
    return lo


@triton.jit
def segment_of_scalar(cu_ptr, idx, num_segments):
    """segment_of for one scalar index."""
    lo = idx * 0
    hi = lo + num_segments
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if tl.load(cu_ptr + mid) <= idx:
            lo = mid
        else:
            hi = mid
    return lo


def segment_tiles(cu_seqlens: torch.Tensor, num_tokens: int, block: int):
    """Tiles of at most `block` rows that never straddle two segments.

    Returns (tile_cu, max_tiles): tile_cu int32 [B+1] where segment b owns tiles
    tile_cu[b] .. tile_cu[b+1]-1, and max_tiles = cdiv(N, block) + B, an upper bound on
    tile_cu[B] known without reading the device (a grid of max_tiles programs covers every tile;
    the surplus programs exit at once).
    """
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
    counts = torch.cumsum(torch.div(lens + (block - 1), block, rounding_mode="floor"), 0)
    tile_cu = torch.cat([counts.new_zeros(1), counts]).to(torch.int32)
    num_segments = cu_seqlens.shape[0] - 1
    return tile_cu, triton.cdiv(num_tokens, block) + num_segments


def tile_table(cu_seqlens: torch.Tensor, blocks) -> torch.Tensor:
    """Cumulative tile counts int32 [len(blocks), B+1]: row r, entry b = sum_{i<b} cdiv(len_i, blocks[r]).

    The flat list of (sequence, tile) work items of a pack, for each tile size an autotuned kernel
    may pick: program p of a kernel with tile size blocks[r] works on tile p - row[b] of the
    sequence b with row[b] <= p < row[b+1] (found by segment_of_scalar). A few tiny device ops, no
    host read, traceable by torch.compile.
    """
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
    rows = [torch.cumsum(torch.div(lens + (bs - 1), bs, rounding_mode="floor"), 0) for bs in blocks]
    counts = torch.stack(rows)
    return torch.cat([counts.new_zeros((len(blocks), 1)), counts], dim=1).to(torch.int32)


def rows_per_program(block_d: int, gpu_elems: int = 4096, interp_elems: int = 1 << 17, max_rows: int = 256) -> int:
    """Rows of a [rows, block_d] tile per program: a register-sized tile when compiled, a large one
    under the interpreter (whose cost is per program, about 6 ms each, not per element)."""
    budget = interp_elems if INTERPRETED else gpu_elems
    return int(max(1, min(max_rows, budget // block_d)))


def num_warps_for(block_elems: int) -> int:
    return 4 if block_elems <= 2048 else 8 if block_elems <= 8192 else 16


def contiguous_interpreter_transpose() -> bool:
    """Opt-in speed-up of the Triton interpreter: tl.trans returns a contiguous array (same values).

    The interpreter's tl.dot calls numpy.matmul with an explicit dtype, which is about 50x slower
    on a strided (transposed) fp32 operand, and the attention backward transposes in its inner
    loops. Patches the interpreter class process-wide; returns False where its internals differ.
    """
    try:
        import numpy as np
        from triton.runtime.interpreter import InterpreterBuilder, TensorHandle
    except ImportError:
        return False
    if not hasattr(InterpreterBuilder, "create_trans"):
        return False

    def create_trans(self, arg, perm):
        return TensorHandle(np.ascontiguousarray(np.transpose(arg.data, perm)), arg.dtype.scalar)

    InterpreterBuilder.create_trans = create_trans
    return True
