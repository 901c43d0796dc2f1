"""Per-resolution evaluation on the built-in shapes data: the CPU-scale analogue of the NiT paper's
FID-per-resolution table.

For every size (height x width, pixels) and every model, `num` images are sampled (class labels
cycling over the shape classes, all sizes in one packed call), then judged by the shapes
classifier of `nit_model.shapes_eval`:

- accuracy: the share of samples the judge assigns to the class they were conditioned on;
- Fréchet distance (FD) between judge features of the samples and of `num_real` real images
  rendered at the same size (lower is better);
- the real-vs-real floor: the FD of `num` real images (a fresh draw) against the same reference.
  With few samples FD is biased upwards, so a model is judged against this floor, not against 0.

A size is "seen" by a model when its training data (the shapes dataset of the checkpoint's
config) can produce it: sides in [min_side, max_side] and aspect ratio <= max_aspect.

    nit eval --ckpt native=runs/demo/native --ckpt fixed=runs/demo/fixed --num 32 --steps 16
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Mapping, Optional, Sequence

import numpy as np
import torch

from .data.shapes import PALETTES, SHAPE_CLASSES
from .sampling import (DEFAULT_TOKEN_BUDGET, SamplingModel, check_sampling_args, load_sampling_model, parse_sizes,
                       sample)
from .shapes_eval import ClassifierConfig, evaluate_resolution, load_or_train_classifier, real_shapes

__all__ = ["DEFAULT_EVAL_SIZES", "EvalReport", "seen_in_training", "real_floor", "training_palette", "evaluate_models",
           "markdown_table", "parse_named_checkpoints"]

# seen by the tiny-shapes run (sides 16-64 px, aspect <= 3), then unseen: larger sides (1.5x, 2x
# the largest trained side), 1:3 / 3:1 beyond the trained sides, and 1:4 / 4:1 beyond the trained
# aspect ratio
DEFAULT_EVAL_SIZES = [(32, 32), (64, 64), (32, 64), (64, 32), (96, 96), (128, 128), (32, 96), (96, 32),
                      (16, 64), (64, 16)]


def seen_in_training(size: tuple[int, int], train_config) -> Optional[bool]:
    """Whether the shapes data of `train_config` (a TrainConfig) can produce `size` (H, W);
    None when it is not shapes data or unknown."""
    data = getattr(train_config, "data", None)
    if data is None or data.kind != "shapes":
        return None
    stride = train_config.nit_config().patch_size
    lo, hi = -(-data.min_side // stride) * stride, (data.max_side // stride) * stride
    h, w = size
    return (lo <= h <= hi and lo <= w <= hi and h % stride == 0 and w % stride == 0
            and max(h, w) / min(h, w) <= data.max_aspect + 1e-9)


def real_floor(classifier, size: tuple[int, int], labels: Sequence[int], *, num_real: int, seed: int,
               palette: str = "colour") -> dict:
    """evaluate_resolution of real images (a draw independent of the reference set) in place of
    samples: the FD and accuracy a perfect model would get at this sample count."""
    h, w = size
    real = real_shapes(labels, h, w, seed=seed + 1, palette=palette)
    return evaluate_resolution(classifier, real, labels, num_real=num_real, seed=seed, palette=palette)


def training_palette(models: Mapping[str, SamplingModel]) -> str:
    """The shapes palette the models were trained on (their checkpoints' data.shapes_palette;
    "colour" when no model records one). Models trained on different palettes are an error:
    one judge and one set of real images cannot serve both."""
    found = {}
    for name, sm in models.items():
        data = getattr(sm.train_config, "data", None)
        if data is not None and data.kind == "shapes":
            found[name] = data.shapes_palette
    if len(set(found.values())) > 1:
        raise ValueError("the models were trained on different shapes palettes ("
                         + ", ".join(f"{n}: {p}" for n, p in found.items())
                         + "); evaluate them separately or pass one palette for all")
    return next(iter(found.values()), "colour")


@dataclasses.dataclass
class EvalReport:
    """rows: one dict per size: height, width, tokens (per image at the models' stride), floor
    (real-vs-real FD), real_accuracy, and per model name a dict {accuracy, frechet, seen}.
    models: name -> {source, steps, sampling seconds, images/s}; settings: what was run."""

    rows: list
    models: dict
    settings: dict

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    def summary(self) -> dict:
        """Per model: mean accuracy and FD over the sizes it saw and the ones it did not, and the
        number of sizes where each model has the lowest FD."""
        names = list(self.models)
        out = {n: {} for n in names}
        for n in names:
            for label, want in (("seen", True), ("unseen", False)):
                rows = [r for r in self.rows if r[n]["seen"] is want]
                out[n][f"{label}_sizes"] = len(rows)
                out[n][f"{label}_accuracy"] = float(np.mean([r[n]["accuracy"] for r in rows])) if rows else math.nan
                out[n][f"{label}_frechet"] = float(np.mean([r[n]["frechet"] for r in rows])) if rows else math.nan
            out[n]["best_frechet_sizes"] = sum(1 for r in self.rows
                                               if min(names, key=lambda m: r[m]["frechet"]) == n)
        return out


def evaluate_models(models: Mapping[str, object], sizes=DEFAULT_EVAL_SIZES, *, num: int = 32, steps: int = 16,
                    solver: str = "euler", cfg_scale: float = 1.0, cfg_interval=(0.0, 1.0), seed: int = 0,
                    num_real: int = 256, classifier=None, classifier_config: ClassifierConfig = ClassifierConfig(),
                    cache_dir: Optional[str] = None, token_budget: int = DEFAULT_TOKEN_BUDGET,
                    palette: Optional[str] = None, progress: bool = True) -> EvalReport:
    """Sample `num` images per size from every model (same seeds for all) and judge them.

    models: name -> a checkpoint path, NiT or SamplingModel (pixel models of the shapes classes).
    classifier: a trained ShapesClassifier (of real images in the same palette), or None to
        load/train one for `classifier_config` in that palette (cached in `cache_dir`).
    palette: of the real images ("colour" or "mono"); None: the one the models were trained on.
    """
    sizes = parse_sizes(sizes)
    check_sampling_args(steps=steps, solver=solver, cfg_scale=cfg_scale, cfg_interval=cfg_interval, seed=seed,
                        token_budget=token_budget)
    if num < 2:
        raise ValueError(f"num must be >= 2 images per size (a Fréchet distance needs a covariance), got {num}")
    if not models:
        raise ValueError("evaluate_models needs at least one model")
    loaded: dict[str, SamplingModel] = {}
    for name, m in models.items():
        sm = load_sampling_model(m)
        if sm.space != "pixels" or sm.model.config.in_channels != 3:
            raise ValueError(f"model {name!r}: the shapes evaluation needs an RGB pixel model (in_channels=3), "
                             f"got space={sm.space!r}, in_channels={sm.model.config.in_channels}")
        if sm.model.config.num_classes < len(SHAPE_CLASSES):
            raise ValueError(f"model {name!r} has {sm.model.config.num_classes} classes; the shapes data has "
                             f"{len(SHAPE_CLASSES)}")
        loaded[name] = sm
    palette = training_palette(loaded) if palette is None else palette
    if palette not in PALETTES:
        raise ValueError(f"unknown palette {palette!r}; choose one of {', '.join(PALETTES)}")
    classifier_config = dataclasses.replace(classifier_config, palette=palette)
    if classifier is None:
        classifier = load_or_train_classifier(cache_dir, classifier_config, progress=progress)
    labels_per_size = [j % len(SHAPE_CLASSES) for j in range(num)]
    rows = [{"height": h, "width": w} for h, w in sizes]
    for r, size in zip(rows, sizes):
        fl = real_floor(classifier, size, labels_per_size, num_real=num_real, seed=seed + 12345, palette=palette)
        r.update(floor=fl["frechet"], real_accuracy=fl["accuracy"])
    info = {}
    for name, sm in loaded.items():
        t0 = time.perf_counter()
        out = sample(sm, sizes, labels=list(range(len(SHAPE_CLASSES))), num=num, steps=steps, solver=solver,
                     cfg_scale=cfg_scale, cfg_interval=cfg_interval, seed=seed, token_budget=token_budget,
                     progress=progress)
        secs = time.perf_counter() - t0
        info[name] = {"source": sm.source, "sampling_seconds": secs, "images": len(out.sizes),
                      "images_per_s": len(out.sizes) / secs, "forwards": out.stats["forwards"],
                      "packs": out.stats["packs"]}
        for k, (r, size) in enumerate(zip(rows, sizes)):
            imgs = torch.stack(out.tensors[k * num:(k + 1) * num])
            res = evaluate_resolution(classifier, imgs, labels_per_size, num_real=num_real, seed=seed + 12345,
                                      palette=palette)
            r[name] = {"accuracy": res["accuracy"], "frechet": res["frechet"],
                       "seen": seen_in_training(size, sm.train_config)}
            r["tokens"] = (size[0] // sm.stride) * (size[1] // sm.stride)
    settings = dict(num=num, steps=steps, solver=solver, cfg_scale=cfg_scale, cfg_interval=list(cfg_interval),
                    seed=seed, num_real=num_real, classifier=dataclasses.asdict(classifier_config))
    return EvalReport(rows, info, settings)


def _aspect(h: int, w: int) -> str:
    g = math.gcd(h, w)
    return f"{h // g}:{w // g}" if max(h, w) // g <= 16 else f"{h / w:.2f}"


def _seen(v) -> str:
    return {True: "seen", False: "**unseen**", None: "?"}[v]


def markdown_table(report: EvalReport) -> str:
    """The per-resolution table (accuracy and FD per model, the real-vs-real floor) and a summary."""
    names = list(report.models)
    head = ["size (HxW)", "aspect", "tokens"]
    for n in names:
        head += [f"{n}: seen?", f"{n} acc", f"{n} FD"]
    head += ["real acc", "real-vs-real FD (floor)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report.rows:
        best = min(names, key=lambda m: r[m]["frechet"])
        cells = [f"{r['height']}x{r['width']}", _aspect(r["height"], r["width"]), str(r.get("tokens", ""))]
        for n in names:
            fd = f"{r[n]['frechet']:.2f}"
            cells += [_seen(r[n]["seen"]), f"{r[n]['accuracy']:.0%}", f"**{fd}**" if n == best and len(names) > 1 else fd]
        cells += [f"{r['real_accuracy']:.0%}", f"{r['floor']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    s = report.summary()
    lines.append("")
    for n in names:
        d = s[n]
        parts = []
        for label in ("seen", "unseen"):
            if d[f"{label}_sizes"]:
                parts.append(f"{label} sizes ({d[f'{label}_sizes']}): mean accuracy {d[f'{label}_accuracy']:.0%}, "
                             f"mean FD {d[f'{label}_frechet']:.2f}")
        lines.append(f"- **{n}**: " + "; ".join(parts) + (f"; lowest FD on {d['best_frechet_sizes']} of "
                                                          f"{len(report.rows)} sizes" if len(names) > 1 else ""))
    st = report.settings
    palette = st.get("classifier", {}).get("palette", "colour")
    lines.append("")
    lines.append(f"{st['num']} samples per size ({st['solver']}, {st['steps']} steps, cfg scale {st['cfg_scale']} "
                 f"on t in {st['cfg_interval']}, seed {st['seed']}); FD against {st['num_real']} real images per "
                 f"size ({palette} palette) in the judge's {2 * 64}-d feature space; the floor is the FD of "
                 f"{st['num']} real images.")
    return "\n".join(lines)


def parse_named_checkpoints(specs: Sequence[str]) -> dict:
    """["native=runs/a", "runs/b"] -> {"native": "runs/a", "b": "runs/b"} (unnamed: the folder name)."""
    out = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            path = spec
            name = os.path.basename(os.path.normpath(spec)) or spec
        if name in out:
            raise ValueError(f"two checkpoints are named {name!r}; name them: --ckpt NAME=PATH")
        out[name] = path
    return out
