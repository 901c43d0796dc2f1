"""Resolution-agnostic judge for the built-in shapes data: a small CNN classifier trained on real
shapes at many sizes and aspect ratios, whose pooled features also give a Fréchet distance
between generated and real images at one resolution (a CPU-scale analogue of FID per resolution).

The classifier first resizes every image so that its shorter side is 32 px (the shapes are drawn
relative to the shorter side, so this normalises scale and keeps the aspect ratio), then applies
a small CNN with global average pooling: it accepts any (H, W) and costs the same at every size.
It is trained on the fly in well under a minute on 2 CPU cores (or loaded from a cache file).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .atomic import atomic_save
from .data.shapes import SHAPE_CLASSES, render_shape
from .frechet import frechet_distance_features

__all__ = ["ShapesClassifier", "ClassifierConfig", "real_shapes", "train_classifier", "load_or_train_classifier",
           "evaluate_resolution", "quadrant_correlation"]


class ShapesClassifier(nn.Module):
    """images [B, 3, H, W] in [-1, 1] (any H, W >= 8) -> logits [B, num_classes]; `features` gives
    the pooled [B, feat_dim] representation used for Fréchet distances."""

    short_side = 32

    def __init__(self, num_classes: int = len(SHAPE_CLASSES), width: int = 16, feat_dim: int = 64):
        super().__init__()

        def block(cin, cout, stride):
            return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.GroupNorm(8, cout), nn.GELU()]

        self.body = nn.Sequential(*block(3, width, 1), *block(width, 2 * width, 2), *block(2 * width, 2 * width, 1),
                                  *block(2 * width, 4 * width, 2), *block(4 * width, feat_dim, 1))
        self.head = nn.Linear(2 * feat_dim, num_classes)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """Resize so the shorter side is 32 px, keeping the aspect ratio (antialiased)."""
        h, w = x.shape[-2:]
        s = self.short_side / min(h, w)
        size = (max(1, round(h * s)), max(1, round(w * s)))
        return x if size == (h, w) else F.interpolate(x, size=size, mode="bilinear", antialias=True,
                                                       align_corners=False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        f = self.body(self.normalise(x))
        # mean and max pooling: the shape covers a small part of a wide image, so max keeps it visible
        return torch.cat([f.mean(dim=(2, 3)), f.amax(dim=(2, 3))], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@dataclass(frozen=True)
class ClassifierConfig:
    steps: int = 300
    batch: int = 32
    short_side: int = 32   # training images are rendered with this shorter side (what the model sees)
    max_aspect: float = 4.0
    lr: float = 5e-3
    seed: int = 0
    classes: tuple = SHAPE_CLASSES
    palette: str = "colour"   # of the real images it learns from: judge samples of a model trained on that palette

    def key(self) -> str:
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def real_shapes(labels: Sequence[int], height: int, width: int, *, seed: int,
                classes: Sequence[str] = SHAPE_CLASSES, palette: str = "colour") -> torch.Tensor:
    """Real shapes images [n, 3, height, width] in [-1, 1] of the given labels, deterministic per seed."""
    out = np.empty((len(labels), 3, height, width), dtype=np.float32)
    for i, lab in enumerate(labels):
        out[i] = render_shape(classes[int(lab)], height, width, np.random.default_rng([seed, 7, i]), palette=palette)
    return torch.from_numpy(out * 2.0 - 1.0)


def _random_size(rng: np.random.Generator, cfg: ClassifierConfig) -> tuple[int, int]:
    short = cfg.short_side
    long = int(rng.integers(short, int(short * cfg.max_aspect) + 1))
    return (long, short) if rng.random() < 0.5 else (short, long)


def train_classifier(cfg: ClassifierConfig = ClassifierConfig(), progress: bool = False) -> ShapesClassifier:
    """Train on freshly rendered real shapes: every step one random aspect ratio at the normalised
    shorter side, a batch of random labels."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model = ShapesClassifier(len(cfg.classes))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.15)
    steps = range(cfg.steps)
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps, desc="shapes classifier", leave=False)
    for step in steps:
        h, w = _random_size(rng, cfg)
        labels = rng.integers(0, len(cfg.classes), cfg.batch)
        x = real_shapes(labels, h, w, seed=cfg.seed * 1_000_003 + step, classes=cfg.classes, palette=cfg.palette)
        loss = F.cross_entropy(model(x), torch.from_numpy(labels))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


def load_or_train_classifier(cache_dir: Optional[str] = None, cfg: ClassifierConfig = ClassifierConfig(),
                             progress: bool = False) -> ShapesClassifier:
    """The classifier for `cfg`, from `cache_dir/shapes_classifier_<key>.safetensors` if present,
    else trained and written there (atomically)."""
    from safetensors.torch import load_file, save_file

    path = os.path.join(cache_dir, f"shapes_classifier_{cfg.key()}.safetensors") if cache_dir else None
    if path and os.path.exists(path):
        model = ShapesClassifier(len(cfg.classes))
        model.load_state_dict(load_file(path))
        return model.eval()
    model = train_classifier(cfg, progress=progress)
    if path:
        atomic_save(path, lambda tmp: save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp))
    return model


@torch.no_grad()
def evaluate_resolution(classifier: ShapesClassifier, images: torch.Tensor, labels: Sequence[int], *,
                        num_real: int = 256, seed: int = 12345,
                        classes: Sequence[str] = SHAPE_CLASSES, palette: str = "colour") -> dict:
    """Class accuracy of generated `images` [n, 3, H, W] (in [-1, 1]) and the Fréchet distance
    between classifier features of those images and of `num_real` real images at the same (H, W)
    (labels drawn uniformly, rendered in `palette`). Also reports the real images' own accuracy as a ceiling."""
    labels = torch.as_tensor(list(labels), dtype=torch.long)
    if images.dim() != 4 or images.shape[0] != labels.numel() or images.shape[1] != 3:
        raise ValueError(f"images must be [n, 3, H, W] with n = len(labels) = {labels.numel()}, "
                         f"got {tuple(images.shape)}")
    h, w = images.shape[-2:]
    real_labels = np.random.default_rng(seed).integers(0, len(classes), num_real)
    real = real_shapes(real_labels, h, w, seed=seed, classes=classes, palette=palette)
    f_gen, f_real = classifier.features(images.float()), classifier.features(real)
    acc = (classifier.head(f_gen).argmax(1) == labels).float().mean().item()
    real_acc = (classifier.head(f_real).argmax(1) == torch.from_numpy(real_labels)).float().mean().item()
    fd = frechet_distance_features(f_gen.numpy(), f_real.numpy()) if images.shape[0] >= 2 else float("nan")
    return {"height": int(h), "width": int(w), "n": int(images.shape[0]), "accuracy": acc,
            "real_accuracy": real_acc, "frechet": fd}


def quadrant_correlation(images: torch.Tensor) -> float:
    """How much an image repeats itself in a 2x2 grid: images [n, 3, H, W] -> the mean, over images
    and the 6 pairs of its quadrants (each H//2 x W//2, grey levels), of the Pearson correlation
    between the two quadrants. About 0 for one shape on a background; near 1 when every quadrant
    holds the same drawing (the periodic repetition of RoPE angles beyond the trained range).
    A constant quadrant correlates 0 with anything."""
    if images.dim() != 4 or images.shape[1] != 3 or min(images.shape[-2:]) < 2:
        raise ValueError(f"images must be [n, 3, H, W] with H, W >= 2, got {tuple(images.shape)}")
    h, w = images.shape[-2] // 2, images.shape[-1] // 2
    g = images.float().mean(1)
    quads = torch.stack([g[:, :h, :w], g[:, :h, w:2 * w], g[:, h:2 * h, :w], g[:, h:2 * h, w:2 * w]], 1).flatten(2)
    z = quads - quads.mean(-1, keepdim=True)
    norm = z.norm(dim=-1, keepdim=True)
    z = torch.where(norm > 1e-8, z / norm.clamp_min(1e-8), torch.zeros_like(z))
    corr = z @ z.transpose(1, 2)  # [n, 4, 4]
    i, j = torch.triu_indices(4, 4, 1)
    return float(corr[:, i, j].mean())
