"""Sampling NiT at any mix of resolutions, packed into as few forwards as possible.

Every requested image, whatever its size, joins a token-budget pack (`nit_model.packing`, LPFHP);
each solver step runs one forward per pack. With classifier-free guidance active (t inside the
guidance interval) the pack holds its images twice, conditional labels then the null class
(``config.num_classes``), so both halves come from the same forward. The official release samples
one resolution per batch; here a 256x256 and a 432x768 request share one sequence.

Images do not depend on their pack-mates: image i draws its initial noise (and its SDE noise, step
after step) from a generator of its own, seeded from (seed, i), and every op of the model acts on
one image's tokens only. Packed sampling therefore equals sampling each image alone, to float
round-off (`tests/model/test_sampling.py`).

Sizes are in pixels, height x width, and must be multiples of the model's pixel stride: the
patch size for pixel models, VAE factor x patch size for latent models (32 for the official
DC-AE f32c32 configs). Latent samples are decoded by a diffusers autoencoder; pixel samples
are unpatchified. Solver semantics are those of `nit_model.solvers` (SiT / REPA / NiT).

    import nit_model
    out = nit_model.sample("runs/tiny", sizes=[(32, 32), (48, 96)], num=4, steps=32, cfg_scale=2.0)
    out.images        # list of uint8 [H, W, 3] numpy arrays, in request order
"""
from __future__ import annotations

import dataclasses
import math
import os
import statistics
import time
from typing import Optional, Sequence, Union

import numpy as np
import torch

import nit_kernels as nk

from .checks import at_least, finite, integer
from .data.collate import patchify, unpatchify
from .packing import pack as pack_items
from .rope_scaling import resolve_rope_scaling, use_rope_scaling
from .solvers import SOLVERS, guided, solve

__all__ = ["SampleResult", "check_sampling_args", "parse_sizes", "parse_labels", "pixel_stride", "nearest_valid_sizes", "check_sizes",
           "image_seed", "plan_packs", "sample_tokens", "sample", "load_sampling_model", "SamplingModel",
           "benchmark_packed_vs_per_resolution", "DEFAULT_TOKEN_BUDGET"]

DEFAULT_TOKEN_BUDGET = 8192  # tokens per forward, both guidance halves counted


# ----------------------------------------------------------------------------------------------
# sizes and labels


def parse_sizes(spec: Union[str, Sequence]) -> list[tuple[int, int]]:
    """"256x256,432x768" (height x width, pixels) or a list of (h, w) pairs -> [(h, w), ...]."""
    if isinstance(spec, str):
        out = []
        for part in (p.strip() for p in spec.split(",")):
            if not part:
                continue
            hw = part.lower().split("x")
            if len(hw) != 2 or not all(s.strip().isdigit() for s in hw):
                raise ValueError(f"a size is HEIGHTxWIDTH in pixels (e.g. 256x256 or 432x768), got {part!r}")
            out.append((int(hw[0]), int(hw[1])))
    else:
        out = [(int(h), int(w)) for h, w in spec]
    if not out:
        raise ValueError("no sizes given; pass e.g. 256x256,432x768")
    bad = [f"{h}x{w}" for h, w in out if h < 1 or w < 1]
    if bad:
        raise ValueError(f"sizes must be positive, got {', '.join(bad)}")
    return out


def parse_labels(spec: Union[None, str, Sequence[int]]) -> Optional[list[int]]:
    """"1,3,5" or a list of ints -> [1, 3, 5]; None or "" -> None (cycle over all classes)."""
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        return None
    if isinstance(spec, str):
        try:
            return [int(s) for s in spec.split(",") if s.strip()]
        except ValueError:
            raise ValueError(f"labels are comma-separated class ids (e.g. 0,3,7), got {spec!r}") from None
    return [int(v) for v in spec]


def pixel_stride(patch_size: int, vae_factor: int = 1) -> int:
    """Pixels per token side: the VAE's downsampling factor times the model's patch size."""
    return int(patch_size) * int(vae_factor)


def nearest_valid_sizes(h: int, w: int, stride: int, limit: int = 4) -> list[tuple[int, int]]:
    """The multiples of `stride` closest to (h, w), nearest first (at least one stride a side)."""
    def around(v):
        lo = max(stride, (v // stride) * stride)
        return sorted({lo, lo + stride} if v % stride else {v}, key=lambda c: (abs(c - v), c))

    cands = [(a, b) for a in around(h) for b in around(w)]
    cands.sort(key=lambda s: (abs(s[0] - h) + abs(s[1] - w), s))
    return cands[:limit]


def check_sizes(sizes: Sequence[tuple[int, int]], stride: int, what: str = "") -> None:
    """Raise ValueError for the first size that is not a positive multiple of `stride`, naming the
    nearest valid sizes."""
    for h, w in sizes:
        if h >= stride and w >= stride and h % stride == 0 and w % stride == 0:
            continue
        sides = [n for n, v in (("height", h), ("width", w)) if v % stride or v < stride]
        near = ", ".join(f"{a}x{b}" for a, b in nearest_valid_sizes(h, w, stride))
        raise ValueError(f"size {h}x{w} (height x width) is not a positive multiple of the model's pixel stride "
                         f"{stride}{what} in {' and '.join(sides)}; nearest valid sizes: {near}")


def image_seed(seed: int, index: int) -> int:
    """A 63-bit seed for image `index` of a request with `seed` (independent streams per image)."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def check_sampling_args(*, steps, solver: str, cfg_scale, cfg_interval, seed, token_budget) -> dict:
    """The sampling settings validated and normalised (ValueError naming the first bad one).

    NaN or infinite numbers are refused: a NaN cfg_scale fails ``cfg_scale > 1`` and would sample
    unguided without a word.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {', '.join(SOLVERS)}, got {solver!r}")
    try:
        low, high = cfg_interval
    except (TypeError, ValueError):
        raise ValueError(f"cfg_interval must be a pair (low, high), got {cfg_interval!r}") from None
    low, high = finite("cfg_interval[0]", low), finite("cfg_interval[1]", high)
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"cfg_interval must satisfy 0 <= low <= high <= 1, got ({low}, {high})")
    return dict(steps=integer("steps", steps, 1), solver=solver, cfg_scale=at_least("cfg_scale", cfg_scale, 0.0),
                cfg_interval=(low, high), seed=integer("seed", seed, 0), token_budget=integer("token_budget", token_budget, 1))


def check_sampling_memory(cfg, token_sizes, *, num: int, token_budget: int, guidance: bool, pixels_per_token: int,
                          device=None, force: bool = False) -> None:
    """Raise MemoryRefusal when sampling these sizes cannot fit (see nit_model.memory), naming what to change."""
    from .memory import check_fits, sampling_estimate
    est = sampling_estimate(cfg, token_sizes, num=num, token_budget=token_budget, guidance=guidance,
                            pixels_per_token=pixels_per_token, device=device)
    longest = max(int(h) * int(w) for h, w in token_sizes)
    advice = ("request smaller sizes (one image alone is too big: "
              f"{longest:,} tokens)" if (2 if guidance else 1) * longest >= token_budget else
              "lower the token budget (--token-budget) so that packs hold fewer tokens, or request fewer images")
    check_fits(est, device=device, force=force, advice=advice + ", or pass --force (force=True) to try anyway")


# ----------------------------------------------------------------------------------------------
# packs


def plan_packs(token_counts: Sequence[int], token_budget: int, *, doubled: bool,
               groups: Optional[Sequence] = None) -> list[list[int]]:
    """Which images share a forward: lists of positions into `token_counts`, ascending.

    An image costs its tokens, twice when `doubled` (both guidance halves in one forward); packs
    hold at most `token_budget` (LPFHP); an image above the budget is sampled alone. With `groups`
    (one key per image), only images of equal key share a pack (one resolution per batch).
    """
    if token_budget < 1:
        raise ValueError(f"token_budget must be a positive number of tokens, got {token_budget}")
    cost = np.asarray(token_counts, dtype=np.int64) * (2 if doubled else 1)
    keys = [0] * len(cost) if groups is None else list(groups)
    out = []
    for key in dict.fromkeys(keys):
        idx = np.array([i for i, k in enumerate(keys) if k == key], dtype=np.int64)
        big = idx[cost[idx] > token_budget]
        out.extend([int(i)] for i in big)
        small = idx[cost[idx] <= token_budget]
        if small.size:
            packing = pack_items(cost[small], int(token_budget), "lpfhp")
            out.extend(sorted(int(small[j]) for j in p) for p in packing.packs)
    return sorted(out, key=lambda p: p[0])


# ----------------------------------------------------------------------------------------------
# the sampler on tokens


def _noise(gen: torch.Generator, channels: int, lat_hw: tuple[int, int], patch: int) -> torch.Tensor:
    """Standard normal noise of one image in its own layout [C, H, W], as tokens [h*w, C, p, p]:
    the same values whatever the pack."""
    return patchify(torch.randn(channels, lat_hw[0], lat_hw[1], generator=gen), patch)


@torch.no_grad()
def sample_tokens(model: torch.nn.Module, sizes: Sequence[tuple[int, int]], labels: Sequence[int], *,
                  steps: int = 32, solver: str = "euler", cfg_scale: float = 1.0,
                  cfg_interval: tuple[float, float] = (0.0, 1.0), seed: int = 0,
                  image_ids: Optional[Sequence[int]] = None, token_budget: int = DEFAULT_TOKEN_BUDGET,
                  per_resolution: bool = False, progress: bool = True, stats: Optional[dict] = None,
                  force: bool = False, precision: str = "fp32", rope=None) -> list[torch.Tensor]:
    """Sample images given in tokens; returns one float32 CPU tensor [h*w, C, p, p] per image.

    model: a NiT (or a module with its ``config`` and ``forward(x, t, y, packed)``).
    sizes: (h, w) in tokens per image. labels: class ids per image, in [0, num_classes).
    image_ids: the index seeding each image's noise (default 0..n-1): image_ids[k] = i draws from
        a generator seeded with image_seed(seed, i).
    per_resolution: pack only images of equal size together (the official one-size batches; for
        comparison). stats: if a dict, receives forwards, packs, tokens_forwarded, seconds.
    force: sample even when the memory estimate (`nit_model.memory`) exceeds the available memory;
        otherwise that raises MemoryRefusal before anything is allocated.
    precision: "fp32", or "bf16" (the forwards under bf16 autocast; the solver state stays fp32).
    rope: a `nit_model.rope_scaling.RoPEScaling` (each image rotated with the table its size gets)
        or None (the model's own table for every image).
    """
    from .precision import autocast, check_precision
    cfg = model.config
    a = check_sampling_args(steps=steps, solver=solver, cfg_scale=cfg_scale, cfg_interval=cfg_interval, seed=seed,
                            token_budget=token_budget)
    steps, cfg_scale, cfg_interval, seed, token_budget = (a[k] for k in ("steps", "cfg_scale", "cfg_interval", "seed",
                                                                           "token_budget"))
    n = len(sizes)
    if n == 0:
        raise ValueError("nothing to sample: no sizes given")
    if len(labels) != n:
        raise ValueError(f"one label per image: {n} sizes but {len(labels)} labels")
    bad = [int(y) for y in labels if not 0 <= int(y) < cfg.num_classes]
    if bad:
        raise ValueError(f"class id {bad[0]} is out of range [0, {cfg.num_classes - 1}] (num_classes={cfg.num_classes})")
    guidance = cfg_scale > 1.0
    if guidance and cfg.num_label_rows <= cfg.null_class:
        raise ValueError(f"cfg_scale={cfg_scale} needs the null class, but this model has no null-class row "
                         f"(class_dropout_prob=0): use cfg_scale=1")
    image_ids = list(range(n)) if image_ids is None else [int(i) for i in image_ids]
    if len(image_ids) != n:
        raise ValueError(f"one image id per image: {n} sizes but {len(image_ids)} ids")
    param = next(model.parameters())
    device, mdtype = param.device, param.dtype
    precision = check_precision(precision, device, where="precision")
    c, p = cfg.in_channels, cfg.patch_size
    sizes = [(int(h), int(w)) for h, w in sizes]
    counts = [h * w for h, w in sizes]
    check_sampling_memory(cfg, sizes, num=1, token_budget=token_budget, guidance=guidance, pixels_per_token=0,
                          device=device, force=force)
    packs = plan_packs(counts, token_budget, doubled=guidance, groups=sizes if per_resolution else None)
    evals_per_pack = 2 * steps - 1 if solver == "heun" else steps  # velocity calls of one pack's solve
    from tqdm.auto import tqdm
    pack_bar = tqdm(packs, desc="sampling packs", unit="pack", disable=not progress or len(packs) == 1,
                    dynamic_ncols=True)
    counters = {"forwards": 0, "tokens_forwarded": 0}
    out: list[Optional[torch.Tensor]] = [None] * n
    t0 = time.perf_counter()
    for members in pack_bar:
        psizes = [sizes[i] for i in members]
        packed = nk.PackedSeqs.from_sizes(psizes, device=device)
        ntok = packed.total_tokens
        packed2 = nk.PackedSeqs.from_sizes(psizes + psizes, device=device) if guidance else None
        y = torch.tensor([int(labels[i]) for i in members], dtype=torch.long, device=device)
        y2 = torch.cat([y, torch.full_like(y, cfg.null_class)]) if guidance else None
        gens = [torch.Generator().manual_seed(image_seed(seed, image_ids[i])) for i in members]
        lat = [(h * p, w * p) for h, w in psizes]
        x = torch.cat([_noise(g, c, hw, p) for g, hw in zip(gens, lat)]).to(device)
        b = len(members)

        def forward(xx, t, yy, pk):
            counters["forwards"] += 1
            counters["tokens_forwarded"] += xx.shape[0]
            tt = torch.full((yy.shape[0],), float(t), dtype=torch.float32, device=device)
            with autocast(precision, device):
                return model(xx.to(mdtype), tt, yy, pk).float()

        def cond(xx, t):
            return forward(xx, t, y, packed)

        def cond_and_uncond(xx, t):
            v = forward(torch.cat([xx, xx]), t, y2, packed2)
            return v[:ntok], v[ntok:]

        def noise(i):  # per-image SDE noise, drawn after the image's initial noise, in step order
            return torch.cat([_noise(g, c, hw, p) for g, hw in zip(gens, lat)]).to(device)

        step_bar = tqdm(total=evals_per_pack, desc=f"steps ({b} image{'s' if b > 1 else ''}, {ntok} tokens)",
                        unit="fwd", leave=False, disable=not progress, dynamic_ncols=True)
        velocity = guided(cond, cond_and_uncond, cfg_scale, tuple(cfg_interval))

        def counted(xx, t):
            step_bar.update(1)
            return velocity(xx, t)

        with use_rope_scaling(model, rope):
            x = solve(counted, x, steps=steps, solver=solver, noise=noise if solver == "sde" else None)
        step_bar.close()
        for i, part in zip(members, torch.split(x, [counts[i] for i in members])):
            out[i] = part.reshape(-1, c, p, p).cpu()
    pack_bar.close()
    if stats is not None:
        stats.update(counters, packs=len(packs), seconds=time.perf_counter() - t0,
                     images=n, tokens=sum(counts))
    return out  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------
# models from checkpoints, decoding, and the user-facing call


@dataclasses.dataclass
class SamplingModel:
    """A NiT ready to sample, with what is needed to turn its output into pixels.

    space: "pixels" (tokens are RGB patches in [-1, 1]) or "latents" (decoded by `vae`).
    vae: a diffusers autoencoder, a name/path for `nit_model.extract_latents.load_vae`, or None.
    vae_factor: pixels per latent pixel (1 for pixel models). scaling/shift: latent = (z - shift) * scaling.
    train_config: the TrainConfig of the run (training checkpoints), else None.
    """

    model: torch.nn.Module
    space: str = "pixels"
    vae: object = None
    vae_factor: int = 1
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    train_config: object = None
    source: Optional[str] = None

    @property
    def stride(self) -> int:
        return pixel_stride(self.model.config.patch_size, self.vae_factor)

    @property
    def class_names(self) -> Optional[tuple]:
        """Names of the trained classes (the shapes data's), or None when unknown."""
        data = getattr(self.train_config, "data", None)
        if getattr(data, "kind", None) == "shapes":
            from .data.shapes import SHAPE_CLASSES
            return SHAPE_CLASSES
        return None

    @property
    def trained_classes(self) -> int:
        """How many class ids the training data used (all of num_classes when unknown)."""
        names = self.class_names
        return len(names) if names else self.model.config.num_classes


def _latent_meta(train_config) -> dict:
    """meta.json of the latent folder a run trained on (VAE name and scaling), if readable."""
    import json
    path = getattr(getattr(train_config, "data", None), "path", None)
    meta = os.path.join(path, "meta.json") if path else None
    if meta and os.path.isfile(meta):
        with open(meta) as f:
            return json.load(f)
    return {}


def _default_space(config, train_config) -> str:
    kind = getattr(getattr(train_config, "data", None), "kind", None)
    if kind is not None:
        return "latents" if kind == "latents" else "pixels"
    return "pixels" if config.in_channels == 3 else "latents"


def load_sampling_model(source, *, config=None, ema: bool = True, vae=None, vae_factor: Optional[int] = None,
                        space: Optional[str] = None, device=None) -> SamplingModel:
    """Load a NiT for sampling from a checkpoint.

    source: a training checkpoint directory (``.../checkpoints/step-N``), a run directory (its
    newest checkpoint), a weights file (safetensors with the NiTConfig in its metadata, or a torch
    file with `config`), an nn.Module, or a SamplingModel (returned as is).
    ema: use the checkpoint's EMA weights (default) rather than the raw ones.
    vae / vae_factor / space: override what the checkpoint implies (latent runs name their VAE in
    the latent folder's meta.json; the default is DC-AE f32c32, as the official configs).
    """
    from .weights import load_model
    if isinstance(source, SamplingModel):
        return source
    train_config, path = None, None
    if isinstance(source, torch.nn.Module):
        model = source
    else:
        path = os.fspath(source)
        if os.path.isdir(path):
            from .trainer.checkpointing import resolve_checkpoint
            from .trainer.config import TrainConfig
            ckpt = resolve_checkpoint(path)
            path = os.path.join(ckpt, "ema.safetensors" if ema else "model.safetensors")
            cfg_path = os.path.join(ckpt, "config.yaml")
            if os.path.isfile(cfg_path):
                train_config = TrainConfig.from_yaml(cfg_path)
                config = config or train_config.nit_config()
        model = load_model(path, config)
    model = model.eval()
    if device is not None:
        model = model.to(device)
    space = space or _default_space(model.config, train_config)
    if space not in ("pixels", "latents"):
        raise ValueError(f"space must be 'pixels' or 'latents', got {space!r}")
    sm = SamplingModel(model, space=space, train_config=train_config, source=path)
    if space == "latents":
        meta = _latent_meta(train_config)
        from .extract_latents import DEFAULT_VAE, vae_downsample_factor, vae_scaling
        sm.vae = vae if vae is not None else meta.get("vae", DEFAULT_VAE)
        if isinstance(sm.vae, torch.nn.Module):
            sm.scaling_factor, sm.shift_factor = vae_scaling(sm.vae)
            sm.vae_factor = vae_downsample_factor(sm.vae)
        sm.scaling_factor = float(meta.get("scaling_factor", sm.scaling_factor))
        sm.shift_factor = float(meta.get("shift_factor", sm.shift_factor))
        sm.vae_factor = int(vae_factor or meta.get("downsample_factor") or
                            (sm.vae_factor if isinstance(sm.vae, torch.nn.Module) else 32))
    elif vae_factor not in (None, 1):
        raise ValueError(f"vae_factor={vae_factor} makes sense only for latent models (space='latents')")
    return sm


def _decoder(sm: SamplingModel):
    """The loaded VAE (loading it by name on first use) and its scaling."""
    if isinstance(sm.vae, (str, os.PathLike)):
        from .extract_latents import load_vae, vae_scaling
        device = next(sm.model.parameters()).device
        try:
            sm.vae = load_vae(os.fspath(sm.vae), device=device)
        except Exception as e:
            raise RuntimeError(f"cannot load the autoencoder {sm.vae!r} to decode latents ({type(e).__name__}: {e}); "
                               f"pass vae= (a diffusers autoencoder or a local folder), or output='latents'") from None
        meta_scale = _latent_meta(sm.train_config).get("scaling_factor")
        if meta_scale is None:
            sm.scaling_factor, sm.shift_factor = vae_scaling(sm.vae)
    if sm.vae is None:
        raise ValueError("a latent model needs a VAE to decode; pass vae= or output='latents'")
    return sm.vae


@torch.no_grad()
def _decode(sm: SamplingModel, tokens: list[torch.Tensor], sizes_tok: list[tuple[int, int]],
            batch: int = 8) -> list[torch.Tensor]:
    """Images float32 [3, H, W] in [-1, 1] from per-image tokens (VAE: equal sizes decoded together)."""
    grids = [unpatchify(t, s) for t, s in zip(tokens, sizes_tok)]
    if sm.space == "pixels":
        return [g.clamp(-1, 1) for g in grids]
    vae = _decoder(sm)
    dev = next(vae.parameters()).device
    dtype = next(vae.parameters()).dtype
    out: list[Optional[torch.Tensor]] = [None] * len(grids)
    by_size: dict = {}
    for i, g in enumerate(grids):
        by_size.setdefault(tuple(g.shape), []).append(i)
    for idx in by_size.values():
        for k in range(0, len(idx), batch):
            part = idx[k:k + batch]
            z = torch.stack([grids[i] for i in part]) / sm.scaling_factor + sm.shift_factor
            img = vae.decode(z.to(dev, dtype))
            img = getattr(img, "sample", img[0] if isinstance(img, (tuple, list)) else img)
            for i, im in zip(part, img.float().cpu()):
                out[i] = im.clamp(-1, 1)
    return out  # type: ignore[return-value]


def to_uint8(img: torch.Tensor) -> np.ndarray:
    """[3, H, W] in [-1, 1] -> uint8 [H, W, 3] (round to nearest)."""
    return ((img.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()


@dataclasses.dataclass
class SampleResult:
    """Samples in request order. images: uint8 [H, W, 3] (None with output='latents');
    tensors: float32 [3, H, W] in [-1, 1] (pixels) or latents [C, h, w]; sizes (H, W) in pixels;
    labels; seeds (per-image generator seeds); stats: forwards, packs, seconds, images_per_s."""

    images: Optional[list]
    tensors: list
    sizes: list
    labels: list
    seeds: list
    stats: dict
    settings: dict


def sample(model, sizes, labels=None, *, num: int = 1, steps: int = 32, solver: str = "euler",
           cfg_scale: float = 1.0, cfg_interval: tuple[float, float] = (0.0, 1.0), seed: int = 0,
           token_budget: int = DEFAULT_TOKEN_BUDGET, output: str = "images", vae=None,
           vae_factor: Optional[int] = None, ema: bool = True, progress: bool = True,
           per_resolution: bool = False, force: bool = False, precision: str = "fp32",
           rope_method: Optional[str] = None, rope_ori_max_pe_len: Optional[int] = None,
           rope_decouple: bool = False) -> SampleResult:
    """Sample `num` images at every size of `sizes`, all packed together.

    model: a NiT, a SamplingModel, or a checkpoint (see `load_sampling_model`; EMA weights by default).
    sizes: "256x256,432x768" or [(h, w), ...] in pixels (height x width), multiples of the pixel
        stride; a size that is not raises ValueError naming the nearest valid sizes.
    labels: class ids cycled over each size's images (image j of a size gets labels[j % len]);
        None cycles over the classes the model was trained on (the shapes classes for shapes
        runs, else 0..num_classes-1).
    steps, solver ("euler" | "heun" | "sde"): see `nit_model.solvers`; cfg_scale > 1 guides with
        the null class, only for t in cfg_interval = (low, high).
    seed: image i (request order: sizes outer, num inner) uses image_seed(seed, i).
    token_budget: tokens per forward (both guidance halves counted); larger images go alone.
    output: "images" (decoded; uint8 arrays too) or "latents" (no decoding; latent models only).
    force: go on when the peak-memory estimate exceeds the available memory (otherwise
        MemoryRefusal is raised, naming the estimate, the memory available and what to change).
    precision: "fp32" or "bf16" (forwards under bf16 autocast; see nit_model.precision).
    rope_method: RoPE scaling per image for sizes beyond the training range (`nit_model.rope_scaling`):
        one of nit_kernels.ROPE_METHODS or "auto"; None: "auto" when the checkpoint records its
        training max side, else the model's own table. rope_ori_max_pe_len: that max side in
        tokens (default: from the checkpoint); rope_decouple: scale each axis by its own side.
    """
    sm = load_sampling_model(model, vae=vae, vae_factor=vae_factor, ema=ema)
    cfg = sm.model.config
    rope = resolve_rope_scaling(rope_method, cfg, sm.train_config, ori_max_pe_len=rope_ori_max_pe_len,
                                decouple=rope_decouple)
    if output not in ("images", "latents"):
        raise ValueError(f"output must be 'images' or 'latents', got {output!r}")
    num = integer("num", num, 1)
    a = check_sampling_args(steps=steps, solver=solver, cfg_scale=cfg_scale, cfg_interval=cfg_interval, seed=seed,
                            token_budget=token_budget)
    steps, cfg_scale, cfg_interval, seed, token_budget = (a[k] for k in ("steps", "cfg_scale", "cfg_interval", "seed",
                                                                           "token_budget"))
    sizes_px = parse_sizes(sizes)
    what = (f" (VAE factor {sm.vae_factor} x patch {cfg.patch_size})" if sm.space == "latents"
            else f" (patch size {cfg.patch_size})")
    check_sizes(sizes_px, sm.stride, what)
    s = sm.stride
    guidance = cfg_scale > 1.0
    check_sampling_memory(cfg, [(h // s, w // s) for h, w in sizes_px], num=num, token_budget=token_budget,
                          guidance=guidance, pixels_per_token=s * s if output == "images" else 0,
                          device=next(sm.model.parameters()).device, force=force)
    labels = parse_labels(labels)
    cycle = labels if labels else list(range(sm.trained_classes))
    req_sizes = [s for s in sizes_px for _ in range(num)]
    req_labels = [cycle[j % len(cycle)] for _ in sizes_px for j in range(num)]
    tok_sizes = [(h // s, w // s) for h, w in req_sizes]
    stats: dict = {}
    t0 = time.perf_counter()
    tokens = sample_tokens(sm.model, tok_sizes, req_labels, steps=steps, solver=solver, cfg_scale=cfg_scale,
                           cfg_interval=tuple(cfg_interval), seed=seed, token_budget=token_budget,
                           per_resolution=per_resolution, progress=progress, stats=stats, force=force,
                           precision=precision, rope=rope)
    if output == "latents":
        tensors, images = [unpatchify(t, hw) for t, hw in zip(tokens, tok_sizes)], None
    else:
        tensors = _decode(sm, tokens, tok_sizes)
        images = [to_uint8(t) for t in tensors]
    stats["total_seconds"] = time.perf_counter() - t0
    stats["images_per_s"] = len(req_sizes) / max(stats["total_seconds"], 1e-9)
    settings = dict(steps=steps, solver=solver, cfg_scale=cfg_scale, cfg_interval=list(cfg_interval), seed=seed,
                    token_budget=token_budget, space=sm.space, stride=s, source=sm.source, precision=precision,
                    rope=dataclasses.asdict(rope) if rope else {"method": "normal"})
    return SampleResult(images, tensors, req_sizes, req_labels, [image_seed(seed, i) for i in range(len(req_sizes))],
                        stats, settings)


# ----------------------------------------------------------------------------------------------
# measurement: packed mixed resolutions vs one resolution per batch


def benchmark_packed_vs_per_resolution(model, sizes: Sequence[tuple[int, int]], *, num_per_size: int = 4,
                                       steps: int = 8, solver: str = "euler", cfg_scale: float = 1.5,
                                       cfg_interval: tuple[float, float] = (0.0, 1.0),
                                       token_budget: int = DEFAULT_TOKEN_BUDGET, reps: int = 3, seed: int = 0,
                                       warmup: bool = True) -> dict:
    """Time sampling the same images (token sizes `sizes`, `num_per_size` each, labels cycling)
    packed across resolutions vs one resolution per batch, on `model` as it is (no decoding).

    Returns medians (and p20/p80 over `reps`) of seconds, the ratio per_resolution / packed, images/s,
    the forwards each mode ran and the largest difference between the two modes' outputs.
    """
    cfg = model.config
    req = [tuple(s) for s in sizes for _ in range(num_per_size)]
    labels = [j % cfg.num_classes for _ in sizes for j in range(num_per_size)]
    kw = dict(steps=steps, solver=solver, cfg_scale=cfg_scale, cfg_interval=cfg_interval, seed=seed,
              token_budget=token_budget, progress=False)
    if warmup:
        sample_tokens(model, req[:1], labels[:1], **{**kw, "steps": 1})
    times: dict = {"packed": [], "per_resolution": []}
    runs: dict = {}
    for _ in range(reps):  # modes interleaved, so that drifting machine load hits both alike
        for mode in times:
            st: dict = {}
            out = sample_tokens(model, req, labels, per_resolution=mode == "per_resolution", stats=st, **kw)
            times[mode].append(st["seconds"])
            runs[mode] = (out, st)
    res = {}
    for mode, ts in times.items():
        q = statistics.quantiles(ts, n=5) if len(ts) >= 2 else [ts[0]] * 4
        st = runs[mode][1]
        res[mode] = {"median_s": statistics.median(ts), "p20_s": q[0], "p80_s": q[-1], "forwards": st["forwards"],
                     "packs": st["packs"], "images_per_s": len(req) / statistics.median(ts)}
    outs = {mode: r[0] for mode, r in runs.items()}
    diff = max(float((a - b).abs().max()) for a, b in zip(outs["packed"], outs["per_resolution"]))
    return {"images": len(req), "sizes": [list(s) for s in sizes], "tokens": sum(h * w for h, w in req),
            "steps": steps, "solver": solver, "cfg_scale": cfg_scale, "threads": torch.get_num_threads(),
            "packed": res["packed"], "per_resolution": res["per_resolution"],
            "speedup": res["per_resolution"]["median_s"] / res["packed"]["median_s"], "max_abs_diff": diff}
