"""Image-folder dataset (ImageNet layout: root/<class>/<image>) at native resolution.

NiT's preprocessing rule (arXiv 2506.03131, section on native-resolution data): keep every
image at its own size and aspect ratio; when its area exceeds `max_area`, resize it to that area
keeping the aspect ratio; then centre-crop each side down to a multiple of the stride (the VAE
downsampling factor times the patch size, 32 for DC-AE f32 with patch 1). No other resizing.
"""
from __future__ import annotations

import math
import os
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

__all__ = ["IMG_EXTENSIONS", "ImageFolderDataset", "native_resolution", "find_images", "load_image"]

IMG_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")


def native_resolution(height: int, width: int, *, stride: int, max_area: Optional[int] = None
                      ) -> tuple[tuple[int, int], tuple[int, int]]:
    """NiT's size rule for an image of (height, width) pixels.

    Returns ``((rh, rw), (H, W))``: the size after the area cap (``(height, width)`` when the
    area is at most `max_area`, else scaled by sqrt(max_area / area) and floored) and the final
    size after cropping each side down to a multiple of `stride`. Raises ValueError when a side
    ends below one stride.
    """
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    rh, rw = int(height), int(width)
    if max_area is not None and rh * rw > max_area:
        s = math.sqrt(max_area / (rh * rw))
        rh, rw = max(1, math.floor(rh * s)), max(1, math.floor(rw * s))
    H, W = rh // stride * stride, rw // stride * stride
    if H == 0 or W == 0:
        capped = f" ({rh}x{rw} after capping the area at {max_area})" if (rh, rw) != (height, width) else ""
        raise ValueError(f"a {height}x{width} image{capped} is smaller than one stride ({stride} px) in a side")
    return (rh, rw), (H, W)


def find_images(root: str, extensions: Sequence[str] = IMG_EXTENSIONS) -> tuple[list[str], list[tuple[str, int]]]:
    """Classes (sorted names of the non-hidden subfolders of `root`) and (path, label) of every
    image below them, sorted. Raises FileNotFoundError for a missing root, no class folder or no
    image."""
    if not os.path.exists(root):
        raise FileNotFoundError(f"image folder {root!r} does not exist")
    if not os.path.isdir(root):
        raise NotADirectoryError(f"image folder {root!r} is not a directory")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise FileNotFoundError(f"no class subfolders in {root!r} (expected {root}/<class>/<image>)")
    exts = tuple(e.lower() for e in extensions)
    samples = []
    for label, name in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, name), followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            samples.extend((os.path.join(dirpath, f), label) for f in sorted(filenames)
                           if f.lower().endswith(exts) and not f.startswith("."))
    if not samples:
        raise FileNotFoundError(f"no images with extensions {', '.join(exts)} under the class folders of {root!r}")
    return classes, samples


def _header_size(path: str) -> tuple[int, int]:
    """(height, width) read from the file header (no decoding)."""
    try:
        with Image.open(path) as im:
            w, h = im.size
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read image {path!r}: {e}") from e
    return h, w


def load_image(path: str, *, stride: int = 32, max_area: Optional[int] = 2048 * 2048) -> torch.Tensor:
    """Decode `path` as RGB and apply `native_resolution`: resize (bicubic) only when the area
    exceeds `max_area`, then centre-crop to multiples of `stride`; float32 [3, H, W] in [-1, 1]."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read image {path!r}: {e}") from e
    try:
        (rh, rw), (H, W) = native_resolution(im.height, im.width, stride=stride, max_area=max_area)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    if im.size != (rw, rh):
        im = im.resize((rw, rh), Image.BICUBIC, reducing_gap=3.0)
    if (H, W) != (rh, rw):
        top, left = (rh - H) // 2, (rw - W) // 2
        im = im.crop((left, top, left + W, top + H))
    arr = np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32)  # numpy: no thread-pool wake-up
    arr /= 127.5
    arr -= 1.0
    return torch.from_numpy(arr)


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images of ``root/<class>/**/<image>`` at native resolution (see `native_resolution`).

    Item i is ``(image, label)``: image float32 [3, H, W] in [-1, 1] with H, W multiples of
    `stride`, label the index of its class folder in sorted order (``classes[label]``).

    The constructor reads every file's header (not its pixels) to know all sizes up front, which
    packing needs; an image too small for one stride raises ValueError naming the file, unless
    `skip_small` is set, in which case it is left out and listed in `skipped`.

    Args:
        root: folder with one subfolder per class.
        stride: pixels per token side: VAE downsampling factor x patch size (32 for DC-AE f32, p=1).
        max_area: area cap in pixels (NiT: 2048 * 2048); None for no cap.
        skip_small: leave out images smaller than one stride instead of raising.
        extensions: file name endings counted as images (case-insensitive).
        progress: show a progress bar while reading headers.
    """

    def __init__(self, root: str, *, stride: int = 32, max_area: Optional[int] = 2048 * 2048, skip_small: bool = False,
                 extensions: Sequence[str] = IMG_EXTENSIONS, progress: bool = False):
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        if max_area is not None and max_area < stride * stride:
            raise ValueError(f"max_area={max_area} is below one stride squared ({stride * stride})")
        self.root, self.stride, self.max_area = str(root), int(stride), max_area
        self.classes, found = find_images(self.root, extensions)
        samples, native, final, skipped = [], [], [], []
        it = found
        if progress:
            from tqdm.auto import tqdm
            it = tqdm(found, desc="reading image sizes", unit="img")
        for path, label in it:
            h, w = _header_size(path)
            try:
                _, fs = native_resolution(h, w, stride=self.stride, max_area=max_area)
            except ValueError as e:
                if not skip_small:
                    raise ValueError(f"{path}: {e}; pass skip_small=True to leave such images out") from None
                skipped.append((path, str(e)))
                continue
            samples.append((path, label))
            native.append((h, w))
            final.append(fs)
        if not samples:
            raise ValueError(f"every image under {self.root!r} is smaller than one stride ({self.stride} px)")
        self.samples = samples
        self.skipped = skipped
        self._native = np.asarray(native, dtype=np.int64)
        self._sizes = np.asarray(final, dtype=np.int64)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def paths(self) -> list[str]:
        return [p for p, _ in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def sizes(self) -> np.ndarray:
        """int64 [M, 2], (H, W) in pixels of every item as returned (after the rule)."""
        return self._sizes.copy()

    def native_sizes(self) -> np.ndarray:
        """int64 [M, 2], (height, width) of every file as stored."""
        return self._native.copy()

    def labels(self) -> np.ndarray:
        return np.asarray([label for _, label in self.samples], dtype=np.int64)

    def __getitem__(self, index) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        img = load_image(path, stride=self.stride, max_area=self.max_area)
        if img.shape[1:] != tuple(self._sizes[index].tolist()):
            raise RuntimeError(f"{path} changed since it was indexed: got {tuple(img.shape[1:])}, "
                               f"expected {tuple(self._sizes[index].tolist())}")
        return img, label

    def __repr__(self) -> str:
        return (f"ImageFolderDataset({self.root!r}, {len(self)} images, {self.num_classes} classes, stride={self.stride}, "
                f"max_area={self.max_area}, skipped={len(self.skipped)})")
