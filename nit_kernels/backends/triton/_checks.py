"""Checks of the packing metadata and launch limits inside the nit_triton ops.

The public API checks its arguments in eager mode, but direct op calls (torch.ops.nit_triton.*)
and torch.compile skip those checks, and a forged cu_seqlens, sizes or max_seqlen would make the
kernels read and write out of bounds. So every op checks what its kernels index with:

- shapes, dtypes and devices (metadata only, free, traceable);
- the values of cu_seqlens (starts at 0, non-decreasing, ends at the token count), of max_seqlen
  (at least the longest sequence, at most int32) and of sizes (h, w >= 1, h * w = the sequence
  length), in the op ``nit_triton::checked_cu_seqlens``. It reduces them on the device to five
  numbers and reads those in one small copy: on a GPU one synchronisation of the stream (a few
  microseconds plus the wait for queued work), which is why a check is remembered per cu_seqlens
  (and sizes) tensor and version: a model's layers share one pack, so a training step pays it once
  per pack, not once per op. The op returns a copy of cu_seqlens (B+1 int32, one tiny kernel) that
  the kernels read, so torch.compile keeps the check in its graph as an opaque op (a triton_op's
  body is traced, and a check without a used output would be dead code).
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch

INT32_MAX = 2**31 - 1
GRID_YZ_MAX = 65535  # CUDA's limit on grid axes 1 and 2 (axis 0: 2**31 - 1)

Tensor = torch.Tensor
_cache: dict = {}  # (id(cu), id(sizes)) -> (weakref(cu), version, weakref(sizes), version, facts)


def fail(op: str, msg: str):
    raise ValueError(f"{op}[triton]: {msg}")


def check_grid(op: str, grid, what=("programs", "heads", "images")):
    """Each axis of a launch grid within CUDA's limits (axis 0 < 2**31, axes 1 and 2 <= 65535)."""
    for axis, n in enumerate(grid):
        limit = INT32_MAX if axis == 0 else GRID_YZ_MAX
        if isinstance(n, int) and not 0 <= n <= limit:
            fail(op, f"grid axis {axis} ({what[axis]}) needs {n} blocks, more than the device allows ({limit})")


def check_cu_layout(op: str, cu, device: torch.device, name: str = "cu_seqlens") -> int:
    """Shape, dtype and device of cu_seqlens (no values read); returns the number of sequences B."""
    if not isinstance(cu, Tensor) or cu.dtype != torch.int32 or cu.dim() != 1 or cu.shape[0] < 2:
        got = f"dtype {cu.dtype}, shape {tuple(cu.shape)}" if isinstance(cu, Tensor) else type(cu).__name__
        fail(op, f"{name} must be an int32 tensor [B+1] with B >= 1, got {got}")
    if cu.device != device:
        fail(op, f"{name} is on {cu.device} but the data is on {device}")
    return cu.shape[0] - 1


def check_shape(op: str, t: Tensor, name: str, shape: tuple):
    if tuple(t.shape) != tuple(shape):
        fail(op, f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def check_device(op: str, device: torch.device, **tensors):
    for name, t in tensors.items():
        if t.device != device:
            fail(op, f"{name} is on {t.device} but the data is on {device}")


def _facts(cu: Tensor, sizes: Optional[Tensor]) -> tuple:
    """(cu[0], cu[-1], min step, max step, bad sizes): one reduction, one device-to-host copy."""
    c = cu.to(torch.int64)
    steps = c[1:] - c[:-1]
    parts = [c[0], c[-1], steps.min(), steps.max()]
    if sizes is not None:
        s = sizes.to(torch.int64)
        bad = (s.min(dim=1).values < 1) | (s[:, 0] * s[:, 1] != steps)
        parts.append(bad.sum())
    else:
        parts.append(c.new_zeros(()))
    return tuple(torch.stack(parts).tolist())


def _cached_facts(cu: Tensor, sizes: Optional[Tensor]) -> tuple:
    key = (id(cu), None if sizes is None else id(sizes))
    hit = _cache.get(key)
    if hit is not None:
        cu_ref, cu_ver, s_ref, s_ver, facts = hit
        if cu_ref() is cu and cu._version == cu_ver and (sizes is None or (s_ref() is sizes and sizes._version == s_ver)):
            return facts
    facts = _facts(cu, sizes)
    if len(_cache) > 64:  # dead entries of earlier packs
        for k in [k for k, v in _cache.items() if v[0]() is None]:
            del _cache[k]
    _cache[key] = (weakref.ref(cu), cu._version, None if sizes is None else weakref.ref(sizes),
                   None if sizes is None else sizes._version, facts)
    return facts


def _checked(cu: Tensor, total: int, max_seqlen: int, sizes: Optional[Tensor], what: str) -> Tensor:
    op, name, max_name = what.split(",")
    first, last, min_step, longest, bad_sizes = _cached_facts(cu, sizes)
    if first != 0:
        fail(op, f"{name}[0] must be 0, got {first}")
    if min_step < 0:
        host = cu.cpu()
        i = int(((host[1:] - host[:-1]) < 0).nonzero()[0, 0])
        fail(op, f"{name} must be non-decreasing, but {name}[{i + 1}]={int(host[i + 1])} < {name}[{i}]={int(host[i])}")
    if last != total:
        fail(op, f"{name}[-1]={last} must equal the number of tokens {total}")
    if max_seqlen >= 0 or max_name:
        if not 0 <= max_seqlen <= INT32_MAX:
            fail(op, f"{max_name}={max_seqlen} must be in [0, 2**31 - 1]")
        if max_seqlen < longest:
            fail(op, f"{max_name}={max_seqlen} is smaller than the longest sequence ({longest})")
    if bad_sizes:
        s, host = sizes.cpu(), cu.cpu()
        lens = host[1:] - host[:-1]
        i = int(((s.min(dim=1).values < 1) | (s[:, 0] * s[:, 1] != lens)).nonzero()[0, 0])
        fail(op, f"sizes[{i}]=(h, w)={tuple(s[i].tolist())} must be positive with h*w equal to the "
                 f"{int(lens[i])} tokens of sequence {i} in {name}")
    return cu.clone()


_checked_op = torch.library.custom_op("nit_triton::checked_cu_seqlens", _checked, mutates_args=())
_checked_op.register_fake(lambda cu, total, max_seqlen, sizes, what: cu.new_empty(cu.shape))


def checked_cu(op: str, cu: Tensor, total: int, *, device: torch.device, name: str = "cu_seqlens",
               max_seqlen: Optional[int] = None, max_name: str = "", sizes: Optional[Tensor] = None) -> Tensor:
    """cu_seqlens after every check of its layout and values (a copy: see the module docstring).

    max_seqlen, when given, must cover the longest sequence; sizes, when given, must be an int32
    [B, 2] table of (h, w) with h * w equal to each sequence's length.
    """
    b = check_cu_layout(op, cu, device, name)
    if sizes is not None:
        if not isinstance(sizes, Tensor) or sizes.dtype != torch.int32 or tuple(sizes.shape) != (b, 2):
            got = f"dtype {sizes.dtype}, shape {tuple(sizes.shape)}" if isinstance(sizes, Tensor) else type(sizes)
            fail(op, f"sizes must be an int32 tensor [{b}, 2] of (h, w) per image, got {got}")
        check_device(op, device, sizes=sizes)
    if isinstance(max_seqlen, int) and not 0 <= max_seqlen <= INT32_MAX:
        fail(op, f"{max_name}={max_seqlen} must be in [0, 2**31 - 1]")  # before any device work
    if isinstance(total, int) and total > INT32_MAX:
        fail(op, f"{total} tokens do not fit the int32 {name}")
    return _checked_op(cu, total, -1 if max_seqlen is None else max_seqlen, sizes, f"{op},{name},{max_name}")
