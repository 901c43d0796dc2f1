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
from .data.collate import unpatchify
from .rope_scaling import parse_rope_methods, resolve_rope_scaling
from .sampling import (DEFAULT_TOKEN_BUDGET, SamplingModel, check_sampling_args, load_sampling_model, parse_sizes,
                       sample_tokens)
from .shapes_eval import (ClassifierConfig, evaluate_resolution, load_or_train_classifier, quadrant_correlation,
                          real_shapes)

__all__ = ["DEFAULT_EVAL_SIZES", "EvalReport", "seen_in_training", "real_floor", "training_palette", "evaluate_models",
           "markdown_table", "method_table", "method_summary", "size_category", "parse_named_checkpoints"]

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
    (real-vs-real FD), real_accuracy, real_tiling, category, and per model name a dict {accuracy,
    frechet, tiling, seen} for its first RoPE method; with several methods, ``by_method`` holds
    model -> method -> that dict. models: name -> {source, sampling seconds, images/s};
    methods: the RoPE methods evaluated ("default" when none was named); settings: what was run.
    ``images`` (an attribute, not serialised): the samples `evaluate_models(keep_images=k)` kept."""

    rows: list
    models: dict
    settings: dict
    methods: list = dataclasses.field(default_factory=lambda: ["default"])

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
                    palette: Optional[str] = None, progress: bool = True, rope_methods=None,
                    rope_ori_max_pe_len: Optional[int] = None, rope_decouple: bool = False,
                    precision: str = "fp32", keep_images: int = 0) -> EvalReport:
    """Sample `num` images per size from every model (same seeds for all) and judge them.

    models: name -> a checkpoint path, NiT or SamplingModel (pixel models of the shapes classes).
    classifier: a trained ShapesClassifier (of real images in the same palette), or None to
        load/train one for `classifier_config` in that palette (cached in `cache_dir`).
    palette: of the real images ("colour" or "mono"); None: the one the models were trained on.
    rope_methods: RoPE methods to sample every model with ("normal,yarn" or a list; see
        `nit_model.rope_scaling`), or a dict model name -> methods (a model not named there gets
        the first list); None: the default rule of `nit_model.sample`. A size whose images get
        the same table under two methods is sampled once (same seeds, same images).
    tiling: `quadrant_correlation` of the samples (real_tiling: of real images).
    precision: of the sampling forwards ("fp32" or "bf16", see `nit_model.precision`).
    keep_images: the first `keep_images` samples of every (model, method, size) are kept in
        ``report.images[(name, method, (h, w))]`` (a tensor [k, 3, H, W] in [-1, 1]; not in
        the JSON), so a caller can show them without sampling again.
    """
    sizes = parse_sizes(sizes)
    if isinstance(rope_methods, Mapping):
        per_model = {n: parse_rope_methods(v) for n, v in rope_methods.items()}
        unknown = sorted(set(per_model) - set(models))
        if unknown:
            raise ValueError(f"rope_methods names model(s) {', '.join(unknown)} that are not evaluated")
        first = next(iter(per_model.values()))
        per_model = {n: per_model.get(n, first) for n in models}
    else:
        one = parse_rope_methods(rope_methods) if rope_methods is not None else [None]
        per_model = {n: one for n in models}
    methods = list(dict.fromkeys(m for ms in per_model.values() for m in ms))
    check_sampling_args(steps=steps, solver=solver, cfg_scale=cfg_scale, cfg_interval=cfg_interval, seed=seed,
                        token_budget=token_budget)
    if isinstance(keep_images, bool) or not isinstance(keep_images, int) or keep_images < 0:
        raise ValueError(f"keep_images must be a number of images >= 0, got {keep_images!r}")
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
        r.update(floor=fl["frechet"], real_accuracy=fl["accuracy"],
                 real_tiling=quadrant_correlation(real_shapes(labels_per_size, *size, seed=seed + 1, palette=palette)))
    info, images = {}, {}
    kw = dict(steps=steps, solver=solver, cfg_scale=cfg_scale, cfg_interval=tuple(cfg_interval), seed=seed,
              token_budget=token_budget, progress=progress, precision=precision)
    kept: dict = {}
    for name, sm in loaded.items():
        stride = sm.stride
        tok = [(h // stride, w // stride) for h, w in sizes]
        done: dict = {}  # (size index, table key) -> judged cell: sizes a method leaves alone are not resampled
        info[name] = {"source": sm.source, "sampling_seconds": 0.0, "images": 0, "forwards": 0, "packs": 0}
        for method in per_model[name]:
            rope = resolve_rope_scaling(method, sm.model.config, sm.train_config, ori_max_pe_len=rope_ori_max_pe_len,
                                        decouple=rope_decouple)
            keys = [rope.image_key(h, w, sm.model.config.rope_positions) if rope else ("trained",) for h, w in tok]
            todo = [k for k in range(len(sizes)) if (k, keys[k]) not in done]
            if todo:
                st: dict = {}
                t0 = time.perf_counter()
                # image j of size k is request image k * num + j, as in nit_model.sample: the same seeds
                out = sample_tokens(sm.model, [tok[k] for k in todo for _ in range(num)], labels_per_size * len(todo),
                                    image_ids=[k * num + j for k in todo for j in range(num)], rope=rope, stats=st,
                                    **kw)
                i = info[name]
                i["sampling_seconds"] += time.perf_counter() - t0
                i["images"] += len(out)
                i["forwards"] += st["forwards"]
                i["packs"] += st["packs"]
                for n_k, k in enumerate(todo):
                    imgs = torch.stack([unpatchify(t, tok[k]).clamp(-1, 1) for t in out[n_k * num:(n_k + 1) * num]])
                    res = evaluate_resolution(classifier, imgs, labels_per_size, num_real=num_real, seed=seed + 12345,
                                              palette=palette)
                    done[(k, keys[k])] = {"accuracy": res["accuracy"], "frechet": res["frechet"],
                                          "tiling": quadrant_correlation(imgs),
                                          "seen": seen_in_training(sizes[k], sm.train_config)}
                    if keep_images:
                        kept[(k, keys[k])] = imgs[:keep_images]
            for k, r in enumerate(rows):
                cell = dict(done[(k, keys[k])])
                r.setdefault("by_method", {}).setdefault(name, {})[method or "default"] = cell
                r.setdefault(name, cell)
                r["tokens"] = tok[k][0] * tok[k][1]
                if keep_images:
                    images[(name, method or "default", sizes[k])] = kept[(k, keys[k])]
        info[name]["images_per_s"] = info[name]["images"] / max(info[name]["sampling_seconds"], 1e-9)
    for r in rows:
        r["category"] = size_category(r, list(loaded), loaded)
    settings = dict(num=num, steps=steps, solver=solver, cfg_scale=cfg_scale, cfg_interval=list(cfg_interval),
                    seed=seed, num_real=num_real, classifier=dataclasses.asdict(classifier_config),
                    rope_ori_max_pe_len=rope_ori_max_pe_len, rope_decouple=rope_decouple, precision=precision)
    report = EvalReport(rows, info, settings, [m or "default" for m in methods])
    report.images = images
    return report


def size_category(row: dict, names: Sequence[str], models: Optional[Mapping] = None) -> str:
    """"seen" (by every model), "seen by <names> only", "unseen larger" (a side beyond every
    model's largest trained side) or "unseen aspect" (sides within range, aspect ratio beyond)."""
    seen = [n for n in names if row[n]["seen"]]
    if seen and len(seen) == len(names):
        return "seen"
    if seen:
        return f"seen by {', '.join(seen)} only"
    sides = []
    for n in names:
        data = getattr(getattr((models or {}).get(n), "train_config", None), "data", None)
        if data is not None and data.kind == "shapes":
            sides.append(data.max_side)
    if sides and max(row["height"], row["width"]) <= max(sides):
        return "unseen aspect"
    return "unseen larger" if sides else "unseen"


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


def _cells(report: EvalReport, row: dict) -> dict:
    """(model, method) -> that row's cell, in report order."""
    by = row.get("by_method") or {n: {report.methods[0]: row[n]} for n in report.models}
    return {(n, m): by[n][m] for n in report.models for m in report.methods if m in by.get(n, {})}


def _better(a: dict, b: dict) -> bool:
    """Higher judge accuracy, then lower FD."""
    return (a["accuracy"], -a["frechet"]) > (b["accuracy"], -b["frechet"])


def method_summary(report: EvalReport) -> dict:
    """Per model and RoPE method: mean accuracy, FD and tiling over the seen and the unseen sizes
    (for that model); "best": per model, the method with the highest unseen accuracy (then lowest FD)."""
    out: dict = {"best": {}}
    for n in report.models:
        out[n] = {}
        for m in report.methods:
            if report.rows and (n, m) not in _cells(report, report.rows[0]):
                continue  # this model was not sampled with this method
            d = {}
            for label, want in (("seen", True), ("unseen", False)):
                cells = [_cells(report, r)[(n, m)] for r in report.rows if r[n]["seen"] is want]
                d[f"{label}_sizes"] = len(cells)
                for key in ("accuracy", "frechet", "tiling"):
                    d[f"{label}_{key}"] = float(np.mean([c[key] for c in cells])) if cells else math.nan
            out[n][m] = d
        ranked = [m for m in out[n] if out[n][m]["unseen_sizes"]]
        if ranked:
            best = ranked[0]
            for m in ranked[1:]:
                a = {"accuracy": out[n][m]["unseen_accuracy"], "frechet": out[n][m]["unseen_frechet"]}
                b = {"accuracy": out[n][best]["unseen_accuracy"], "frechet": out[n][best]["unseen_frechet"]}
                best = m if _better(a, b) else best
            out["best"][n] = best
    return out


def method_table(report: EvalReport) -> str:
    """One table for every model and RoPE method: rows = sizes (with their category), columns =
    model: method, cells = judge accuracy / FD / tiling (quadrant correlation); the best cell of
    each row (accuracy, then FD) in bold; then the real images' figures and a summary per method."""
    cols = list(_cells(report, report.rows[0])) if report.rows else []
    label = {c: (c[1] if len(report.models) == 1 else f"{c[0]}: {c[1]}") for c in cols}
    head = ["size (HxW)", "category"] + [label[c] for c in cols] + ["real acc / FD floor / tiling"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report.rows:
        cells = _cells(report, r)
        best = cols[0]
        for c in cols[1:]:
            best = c if _better(cells[c], cells[best]) else best
        row = [f"{r['height']}x{r['width']}", r.get("category", "")]
        for c in cols:
            v = cells[c]
            text = f"{v['accuracy']:.0%} / {v['frechet']:.1f} / {v.get('tiling', math.nan):.2f}"
            row.append(f"**{text}**" if c == best and len(cols) > 1 else text)
        row.append(f"{r['real_accuracy']:.0%} / {r['floor']:.1f} / {r.get('real_tiling', math.nan):.2f}")
        lines.append("| " + " | ".join(row) + " |")
    s = method_summary(report)
    lines += ["", "Cells: judge accuracy / FD (lower is better) / tiling, the mean correlation between an "
                  "image's quadrants (about 0 for one shape, 1 for a 2x2 repetition); bold: the best of the row "
                  "(accuracy, then FD).", ""]
    for n in report.models:
        for m in s[n]:
            d = s[n][m]
            parts = [f"{lab} sizes ({d[f'{lab}_sizes']}): accuracy {d[f'{lab}_accuracy']:.0%}, FD "
                     f"{d[f'{lab}_frechet']:.1f}, tiling {d[f'{lab}_tiling']:.2f}"
                     for lab in ("seen", "unseen") if d[f"{lab}_sizes"]]
            mark = " (best at unseen sizes)" if s["best"].get(n) == m and len(s[n]) > 1 else ""
            lines.append(f"- **{label.get((n, m), m)}**{mark}: " + "; ".join(parts))
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
