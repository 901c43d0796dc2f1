"""Patchify images (or latents) to tokens and collate a pack of them into one batch.

Token layout is the official NiT one: an image [C, H, W] with patch p becomes h*w tokens of
shape [C, p, p] (h = H/p, w = W/p), row-major: token t covers rows (t // w)*p .. +p and columns
(t % w)*p .. +p. A batch concatenates the images' tokens in pack order, which is what
`nit_kernels.PackedSeqs.from_sizes(sizes)` describes.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence, Union

import torch

from nit_kernels import PackedSeqs

__all__ = ["patchify", "unpatchify", "unpatchify_packed", "PackedBatch", "collate_packed", "PackCollate"]


def patchify(img: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[C, H, W] -> tokens [h*w, C, p, p] (h = H/p, w = W/p, row-major). H, W must be multiples of p."""
    if img.dim() != 3:
        raise ValueError(f"patchify expects one image [C, H, W], got shape {tuple(img.shape)}")
    c, H, W = img.shape
    p = int(patch_size)
    if p < 1 or H % p or W % p:
        raise ValueError(f"image {H}x{W} is not a multiple of patch_size={patch_size}")
    h, w = H // p, W // p
    return img.reshape(c, h, p, w, p).permute(1, 3, 0, 2, 4).reshape(h * w, c, p, p)


def unpatchify(tokens: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Inverse of `patchify`: tokens [h*w, C, p, p] and size (h, w) in tokens -> [C, h*p, w*p].

    (A model output [N, C*p*p] is first viewed as [N, C, p, p], the official channel-major order.)"""
    if tokens.dim() != 4 or tokens.shape[2] != tokens.shape[3]:
        raise ValueError(f"unpatchify expects tokens [h*w, C, p, p], got shape {tuple(tokens.shape)}")
    h, w = (int(v) for v in size)
    n, c, p, _ = tokens.shape
    if h * w != n:
        raise ValueError(f"size {h}x{w} needs {h * w} tokens, got {n}")
    return tokens.reshape(h, w, c, p, p).permute(2, 0, 3, 1, 4).reshape(c, h * p, w * p)


def unpatchify_packed(x: torch.Tensor, sizes: Union[torch.Tensor, Sequence[Sequence[int]]]) -> list[torch.Tensor]:
    """Split a packed batch x [N, C, p, p] into its images [C, h_i*p, w_i*p] (sizes in tokens)."""
    rows = sizes.tolist() if isinstance(sizes, torch.Tensor) else [tuple(s) for s in sizes]
    counts = [int(h) * int(w) for h, w in rows]
    if sum(counts) != x.shape[0]:
        raise ValueError(f"sizes describe {sum(counts)} tokens, x has {x.shape[0]}")
    return [unpatchify(t, s) for t, s in zip(torch.split(x, counts), rows)]


@dataclasses.dataclass
class PackedBatch:
    """One pack of images as a training batch.

    x: [N, C, p, p] tokens of all images, concatenated in pack order (dtype of the items).
    sizes: int32 [B, 2], (h, w) in tokens of each image: ``PackedSeqs.from_sizes(sizes)``.
    labels: int64 [B].
    """

    x: torch.Tensor
    sizes: torch.Tensor
    labels: torch.Tensor

    def packed(self, device=None) -> PackedSeqs:
        """The pack's metadata (cu_seqlens, max_seqlen...) on `device` (default: that of x)."""
        return PackedSeqs.from_sizes(self.sizes, device=self.x.device if device is None else device)

    def to(self, device, non_blocking: bool = False) -> "PackedBatch":
        return PackedBatch(*(t.to(device, non_blocking=non_blocking) for t in (self.x, self.sizes, self.labels)))

    def pin_memory(self) -> "PackedBatch":  # DataLoader(pin_memory=True) calls this
        return PackedBatch(self.x.pin_memory(), self.sizes.pin_memory(), self.labels.pin_memory())

    @property
    def num_images(self) -> int:
        return int(self.sizes.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.x.shape[0])

    def images(self) -> list[torch.Tensor]:
        """The images back, [C, h*p, w*p] each."""
        return unpatchify_packed(self.x, self.sizes)


def collate_packed(batch: Sequence[tuple[torch.Tensor, int]], patch_size: int = 1) -> PackedBatch:
    """Turn a list of (image or latent [C, H, W], label) into one `PackedBatch` with patch p."""
    if len(batch) == 0:
        raise ValueError("cannot collate an empty pack")
    tokens, sizes, labels = [], [], []
    channels = batch[0][0].shape[0]
    for i, (img, label) in enumerate(batch):
        if not isinstance(img, torch.Tensor) or img.dim() != 3:
            raise ValueError(f"item {i} of the pack is not a [C, H, W] tensor: {type(img).__name__} "
                             f"{tuple(getattr(img, 'shape', ()))}")
        if img.shape[0] != channels:
            raise ValueError(f"item {i} has {img.shape[0]} channels, item 0 has {channels}")
        tokens.append(patchify(img, patch_size))
        sizes.append((img.shape[1] // patch_size, img.shape[2] // patch_size))
        labels.append(int(label))
    return PackedBatch(torch.cat(tokens), torch.tensor(sizes, dtype=torch.int32), torch.tensor(labels, dtype=torch.int64))


class PackCollate:
    """Picklable ``collate_fn`` for a DataLoader: ``PackCollate(patch_size)(items) -> PackedBatch``."""

    def __init__(self, patch_size: int = 1):
        if patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {patch_size}")
        self.patch_size = int(patch_size)

    def __call__(self, batch) -> PackedBatch:
        return collate_packed(batch, self.patch_size)

    def __repr__(self) -> str:
        return f"PackCollate(patch_size={self.patch_size})"
