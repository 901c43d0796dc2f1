"""Packing metadata: which rows of a packed token sequence belong to which image.

Tokens of image ``i`` occupy rows ``cu_seqlens[i] .. cu_seqlens[i+1]-1``, row-major: token ``t``
of an ``h x w`` image sits at row ``t // w`` and column ``t % w``.
"""
from __future__ import annotations

import dataclasses
import functools
import operator
from typing import Sequence, Union

import torch

SizesLike = Union[torch.Tensor, Sequence[Sequence[int]]]

__all__ = ["PackedSeqs", "POSITIONS", "segment_ids", "token_positions", "validate_cu_seqlens"]

# the orders of axial RoPE positions (see token_positions): true 2D, and the released checkpoints'
POSITIONS = ("grid", "official")


def _as_int(v) -> int:
    if isinstance(v, bool):
        raise TypeError(f"got the bool {v!r}")
    try:
        return operator.index(v)
    except TypeError:
        raise TypeError(f"got {v!r} of type {type(v).__name__}") from None


def _host_sizes(sizes: SizesLike) -> torch.Tensor:
    """Validate `sizes` and return it as a CPU int64 [B, 2] tensor."""
    if isinstance(sizes, torch.Tensor):
        if sizes.dtype not in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
            raise ValueError(f"sizes must be an integer tensor of (h, w) pairs, got dtype {sizes.dtype}")
        host = sizes.detach().to("cpu", torch.int64)
    else:
        try:
            rows = [tuple(s) for s in sizes]
        except TypeError as e:
            raise ValueError(f"sizes must be a list of (h, w) pairs or an int tensor [B, 2], got {sizes!r}") from e
        if not all(len(r) == 2 for r in rows):
            bad = next(r for r in rows if len(r) != 2)
            raise ValueError(f"each size must be an (h, w) pair, got {bad!r}")
        try:
            ints = [[_as_int(v) for v in r] for r in rows]
        except TypeError as e:
            raise ValueError(f"sizes must hold integers: {e}") from None
        host = torch.tensor(ints, dtype=torch.int64).reshape(-1, 2)
    if host.dim() != 2 or host.shape[1] != 2:
        raise ValueError(f"sizes must have shape [B, 2] (h, w per image), got shape {tuple(host.shape)}")
    if host.shape[0] == 0:
        raise ValueError("a pack needs at least one image, got zero sizes")
    bad = (host <= 0).any(dim=1).nonzero()
    if bad.numel():
        i = int(bad[0, 0])
        raise ValueError(f"image sizes must be positive, got (h, w)={tuple(host[i].tolist())} for image {i}")
    if int((host[:, 0] * host[:, 1]).sum()) >= 2**31:
        raise ValueError("a pack must hold fewer than 2**31 tokens (cu_seqlens is int32)")
    return host


def validate_cu_seqlens(cu_seqlens: torch.Tensor, total_tokens: int | None = None, name: str = "cu_seqlens") -> int:
    """Check an int32 [B+1] cu_seqlens: starts at 0, non-decreasing, ends at `total_tokens`.

    Reads the values once (one device->host copy for GPU tensors); raises ValueError naming the
    problem. Returns the longest sequence (max of the steps), which callers need next.
    """
    if not isinstance(cu_seqlens, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32:
        raise ValueError(f"{name} must be int32, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"{name} must be 1-D with B+1 >= 2 entries, got shape {tuple(cu_seqlens.shape)}")
    host = cu_seqlens.detach().cpu()
    if int(host[0]) != 0:
        raise ValueError(f"{name}[0] must be 0, got {int(host[0])}")
    steps = host[1:] - host[:-1]
    if (steps < 0).any():
        i = int((steps < 0).nonzero()[0, 0])
        raise ValueError(f"{name} must be non-decreasing, but {name}[{i + 1}]={int(host[i + 1])} < {name}[{i}]={int(host[i])}")
    if total_tokens is not None and int(host[-1]) != total_tokens:
        raise ValueError(f"{name}[-1]={int(host[-1])} must equal the number of tokens {total_tokens}")
    return int(steps.max())


def segment_ids(cu_seqlens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Image index of every token, int64 [N]; traceable (no host sync)."""
    t = torch.arange(num_tokens, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens[1:].contiguous(), t, right=True)


def token_positions(cu_seqlens: torch.Tensor, sizes: torch.Tensor, num_tokens: int, positions: str = "grid"):
    """Axial RoPE positions (p0, p1) of every token, int64 [N] each; traceable.

    grid:     p0 = t % w (column), p1 = t // w (row)
    official: p0 = t % h,          p1 = t // h   (the released NiT checkpoints' order)
    t is the token index inside its image.
    """
    if positions not in POSITIONS:
        raise ValueError(f"positions must be 'grid' or 'official', got {positions!r}")
    seg = segment_ids(cu_seqlens, num_tokens)
    t = torch.arange(num_tokens, device=cu_seqlens.device, dtype=torch.int64) - cu_seqlens.long()[seg]
    m = sizes.long()[seg, 1 if positions == "grid" else 0]
    return t % m, torch.div(t, m, rounding_mode="floor")


@dataclasses.dataclass(frozen=True, eq=False)
class PackedSeqs:
    """Metadata of images packed into one token sequence.

    Attributes:
        sizes: int32 [B, 2], (h, w) in tokens of every image.
        cu_seqlens: int32 [B+1], cu[0] = 0, cu[i+1] = cu[i] + h_i * w_i.
        max_seqlen, total_tokens, num_seqs: Python ints, computed once on the host.

    Build with ``PackedSeqs.from_sizes([(h, w), ...])`` (or the official int ``hw_list`` tensor).
    Constructing directly validates that `cu_seqlens` agrees with `sizes`.
    """

    sizes: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    total_tokens: int
    num_seqs: int

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Check that the tensors and ints agree (ValueError naming the problem otherwise); a strided
        sizes or cu_seqlens is replaced by a contiguous copy.

        Runs at construction; the ops run it again (host side, CPU packs) for a pack whose fields
        changed since, or that was put together without the constructor. One device->host copy
        for GPU packs.
        """
        seen = self.__dict__.get("_validated")
        if seen is not None and seen[0] is self.sizes and seen[1] is self.cu_seqlens and seen[2] == self._stamp():
            return
        for name in ("sizes", "cu_seqlens"):
            t = getattr(self, name, None)
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if not t.is_contiguous():  # kernels read the metadata as flat arrays: keep a contiguous copy
                object.__setattr__(self, name, t.contiguous())
        host = _host_sizes(self.sizes)
        if self.sizes.dtype != torch.int32:
            raise ValueError(f"sizes must be int32, got {self.sizes.dtype} (use PackedSeqs.from_sizes to convert)")
        if self.cu_seqlens.device != self.sizes.device:
            raise ValueError(f"cu_seqlens is on {self.cu_seqlens.device} but sizes is on {self.sizes.device}")
        seqlens = host[:, 0] * host[:, 1]
        validate_cu_seqlens(self.cu_seqlens, int(seqlens.sum()))
        if self.cu_seqlens.numel() != host.shape[0] + 1:
            raise ValueError(
                f"cu_seqlens has {self.cu_seqlens.numel()} entries but sizes describes {host.shape[0]} images (expected B+1)"
            )
        cu_host = self.cu_seqlens.detach().cpu().long()
        if not torch.equal(cu_host[1:] - cu_host[:-1], seqlens):
            i = int(((cu_host[1:] - cu_host[:-1]) != seqlens).nonzero()[0, 0])
            raise ValueError(
                f"cu_seqlens gives image {i} {int(cu_host[i + 1] - cu_host[i])} tokens but sizes[{i}]="
                f"{tuple(host[i].tolist())} holds {int(seqlens[i])}"
            )
        expected = (int(seqlens.max()), int(seqlens.sum()), host.shape[0])
        got = tuple(getattr(self, f, None) for f in ("max_seqlen", "total_tokens", "num_seqs"))
        if got != expected:
            raise ValueError(f"(max_seqlen, total_tokens, num_seqs)={got} disagree with sizes, expected {expected}")
        object.__setattr__(self, "_validated", (self.sizes, self.cu_seqlens, self._stamp()))

    def _stamp(self) -> tuple:
        """The in-place versions of the tensors and the ints: what a later validate() compares."""
        return (self.sizes._version, self.cu_seqlens._version, self.max_seqlen, self.total_tokens, self.num_seqs)

    @classmethod
    def from_sizes(cls, sizes: SizesLike, device: torch.device | str | None = None) -> "PackedSeqs":
        """Pack images of the given (h, w) token sizes, in order.

        `sizes` is a list of (h, w) pairs or an integer tensor [B, 2] (the official ``hw_list``).
        `device` defaults to the device of a tensor `sizes`, else CPU.
        """
        host = _host_sizes(sizes)
        if device is None:
            device = sizes.device if isinstance(sizes, torch.Tensor) else "cpu"
        seqlens = host[:, 0] * host[:, 1]
        cu = torch.zeros(host.shape[0] + 1, dtype=torch.int64)
        torch.cumsum(seqlens, 0, out=cu[1:])
        return cls(
            sizes=host.to(device=device, dtype=torch.int32),
            cu_seqlens=cu.to(device=device, dtype=torch.int32),
            max_seqlen=int(seqlens.max()),
            total_tokens=int(seqlens.sum()),
            num_seqs=host.shape[0],
        )

    @property
    def device(self) -> torch.device:
        return self.cu_seqlens.device

    @property
    def seqlens(self) -> torch.Tensor:
        """int32 [B], tokens per image."""
        return self.sizes[:, 0] * self.sizes[:, 1]

    @functools.cached_property
    def seg_ids(self) -> torch.Tensor:
        """int32 [N], the image index of every token (computed on first use, then cached)."""
        return segment_ids(self.cu_seqlens, self.total_tokens).to(torch.int32)

    @functools.cached_property
    def size_list(self) -> list[tuple[int, int]]:
        """[(h, w), ...] as Python ints (host copy, cached)."""
        return [tuple(r) for r in self.sizes.cpu().tolist()]

    def positions(self, mode: str = "grid") -> tuple[torch.Tensor, torch.Tensor]:
        """(p0, p1) int64 [N]: the axial RoPE positions of every token (see `token_positions`)."""
        return token_positions(self.cu_seqlens, self.sizes, self.total_tokens, mode)

    def to(self, device: torch.device | str) -> "PackedSeqs":
        """The same pack with its tensors on `device` (no re-validation, ints kept)."""
        device = torch.device(device)
        if device == self.device:
            return self
        new = object.__new__(PackedSeqs)
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            object.__setattr__(new, f.name, v.to(device) if isinstance(v, torch.Tensor) else v)
        return new

    def split(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Split a packed tensor [N, ...] into the per-image tensors [h_i*w_i, ...]."""
        if x.shape[0] != self.total_tokens:
            raise ValueError(f"expected a packed tensor with {self.total_tokens} rows, got shape {tuple(x.shape)}")
        return list(torch.split(x, [h * w for h, w in self.size_list]))

    def __len__(self) -> int:
        return self.num_seqs

    def __repr__(self) -> str:
        shown = self.size_list[:6]
        more = ", ..." if self.num_seqs > 6 else ""
        return (f"PackedSeqs(num_seqs={self.num_seqs}, total_tokens={self.total_tokens}, "
                f"max_seqlen={self.max_seqlen}, sizes=[{', '.join(f'{h}x{w}' for h, w in shown)}{more}], "
                f"device={self.device})")
