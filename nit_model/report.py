"""Writing samples and reports: PNG files, a contact sheet of mixed sizes, ADM-format .npz
files, a loss-curve plot and markdown.

The .npz files follow the reference batches of the ADM / guided-diffusion evaluation suite
(Dhariwal & Nichol 2021, github openai/guided-diffusion, evaluations/evaluator.py): ``arr_0`` is
uint8 [N, H, W, 3] and, as guided-diffusion's class-conditional sampler writes, ``arr_1`` the int64
[N] class labels. That suite needs one size per file, so mixed sizes give one file per size,
named by it: ``samples_<N>x<H>x<W>x3.npz``.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np

from .atomic import atomic_write_text

__all__ = ["save_pngs", "contact_sheet", "save_npz", "save_samples", "plot_loss", "write_text"]


def save_pngs(images: Sequence[np.ndarray], labels: Sequence[int], out_dir: str,
              class_names: Optional[Sequence[str]] = None) -> list[str]:
    """One PNG per uint8 [H, W, 3] image: ``<index>_<H>x<W>_<class>.png``; returns the paths."""
    from PIL import Image
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for i, (img, y) in enumerate(zip(images, labels)):
        name = class_names[y] if class_names is not None and 0 <= y < len(class_names) else f"class{y}"
        path = os.path.join(out_dir, f"{i:05d}_{img.shape[0]}x{img.shape[1]}_{name}.png")
        Image.fromarray(img).save(path)
        paths.append(path)
    return paths


def contact_sheet(images: Sequence[np.ndarray], path: str, *, max_width: int = 1024, pad: int = 4,
                  scale: int = 1, background: int = 40) -> str:
    """Lay images of any sizes out at their native size (times `scale`), left to right in rows
    no wider than max(max_width, widest image); write a PNG and return its path."""
    from PIL import Image
    if not images:
        raise ValueError("contact_sheet needs at least one image")
    tiles = [Image.fromarray(im) for im in images]
    if scale != 1:
        tiles = [t.resize((t.width * scale, t.height * scale), Image.NEAREST) for t in tiles]
    width = max(max_width, max(t.width for t in tiles) + 2 * pad)
    rows, row, x = [], [], pad
    for t in tiles:
        if row and x + t.width + pad > width:
            rows.append(row)
            row, x = [], pad
        row.append((x, t))
        x += t.width + pad
    rows.append(row)
    height = pad + sum(max(t.height for _, t in r) + pad for r in rows)
    sheet = Image.new("RGB", (width, height), (background,) * 3)
    y = pad
    for r in rows:
        for x, t in r:
            sheet.paste(t, (x, y))
        y += max(t.height for _, t in r) + pad
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    sheet.save(path)
    return path


def save_npz(images: Sequence[np.ndarray], labels: Sequence[int], out_dir: str) -> list[str]:
    """ADM-format .npz files (arr_0 uint8 [N, H, W, 3], arr_1 int64 [N] labels), one per size,
    in order of first appearance; returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    groups: dict = {}
    for img, y in zip(images, labels):
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"images must be uint8 [H, W, 3], got {img.dtype} {img.shape}")
        groups.setdefault(img.shape[:2], []).append((img, y))
    paths = []
    for (h, w), items in groups.items():
        arr = np.stack([im for im, _ in items])
        path = os.path.join(out_dir, f"samples_{arr.shape[0]}x{h}x{w}x3.npz")
        np.savez(path, arr_0=arr, arr_1=np.asarray([y for _, y in items], dtype=np.int64))
        paths.append(path)
    return paths


def save_samples(result, out_dir: str, *, class_names: Optional[Sequence[str]] = None,
                 sheet_scale: Optional[int] = None, write_pngs: bool = True) -> dict:
    """Write a `nit_model.sampling.SampleResult`: PNGs under out_dir/images, contact_sheet.png and
    the .npz file(s). Returns {"pngs", "contact_sheet", "npz", "note"}."""
    if result.images is None:
        raise ValueError("these samples are latents (output='latents'); only decoded images can be written")
    os.makedirs(out_dir, exist_ok=True)
    pngs = save_pngs(result.images, result.labels, os.path.join(out_dir, "images"), class_names) if write_pngs else []
    if sheet_scale is None:  # small images (the CPU demo's 16-128 px) are shown enlarged
        sheet_scale = max(1, min(4, 256 // max(max(im.shape[:2]) for im in result.images)))
    sheet = contact_sheet(result.images, os.path.join(out_dir, "contact_sheet.png"), scale=sheet_scale)
    npz = save_npz(result.images, result.labels, out_dir)
    note = (f"{len(npz)} sizes: one .npz per size (the ADM evaluation suite reads one size per file)"
            if len(npz) > 1 else "one .npz (ADM format: arr_0 uint8 [N, H, W, 3], arr_1 labels)")
    return {"pngs": pngs, "contact_sheet": sheet, "npz": npz, "note": note}


def plot_loss(curves: dict, path: str, *, smooth: int = 10, title: str = "training loss") -> str:
    """Plot per-step losses: curves = {name: (steps, losses)}; a running mean over `smooth` steps
    is drawn over the raw values. Matplotlib with the Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    for k, (name, (steps, losses)) in enumerate(curves.items()):
        steps, losses = np.asarray(steps), np.asarray(losses, dtype=np.float64)
        color = f"C{k}"
        ax.plot(steps, losses, color=color, alpha=0.25, linewidth=0.8)
        if len(losses) >= smooth > 1:
            kernel = np.ones(smooth) / smooth
            ax.plot(steps[smooth - 1:], np.convolve(losses, kernel, mode="valid"), color=color, label=name)
        else:
            ax.plot(steps, losses, color=color, label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("flow-matching loss (MSE of v)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_text(path: str, text: str) -> str:
    """Write `text` to `path` atomically (see nit_model.atomic); the folder is created if missing."""
    return atomic_write_text(path, text)
