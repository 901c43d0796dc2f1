"""Encode an image folder to VAE latents at native resolution (``nit extract-latents``).

NiT trains on DC-AE f32c32 latents (``mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers``): each image
keeps its own size (area capped, sides cropped to multiples of 32, see
`nit_model.data.native_resolution`) and becomes a latent [32, H/32, W/32], scaled by the VAE's
scaling factor. Images of equal size are encoded together in batches; the latents go to a latent
folder (`nit_model.data.LatentWriter`: safetensors shards + index.jsonl) that
`nit_model.data.LatentDataset` reads.

    from nit_model.extract_latents import extract_latents
    extract_latents("imagenet/train", "latents/", vae="path/to/dc-ae-f32c32-diffusers")

Command line: ``python -m nit_model.extract_latents --data DIR --out DIR --vae NAME_OR_PATH``.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
from typing import Optional, Union

import torch

from .data.folder import ImageFolderDataset
from .data.latents import LatentWriter

__all__ = ["load_vae", "vae_downsample_factor", "vae_scaling", "encode", "extract_latents", "add_arguments", "main"]

DEFAULT_VAE = "mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_vae(name_or_path: str, *, vae_class: Optional[str] = None, device="cpu", dtype=torch.float32) -> torch.nn.Module:
    """Load a diffusers autoencoder in eval mode.

    The class is `vae_class` if given, else the ``_class_name`` of a local folder's config.json,
    else ``AutoencoderDC`` (the NiT VAE).
    """
    try:
        import diffusers
    except ImportError as e:
        raise ImportError("extracting latents needs diffusers: pip install 'nit-kernels[diffusers]'") from e
    if vae_class is None:
        cfg = os.path.join(name_or_path, "config.json")
        if os.path.isfile(cfg):
            with open(cfg) as f:
                vae_class = json.load(f).get("_class_name")
    vae_class = vae_class or "AutoencoderDC"
    cls = getattr(diffusers, vae_class, None)
    if cls is None:
        raise ValueError(f"diffusers has no autoencoder class {vae_class!r}")
    return cls.from_pretrained(name_or_path, torch_dtype=dtype).to(device).eval()


def vae_downsample_factor(vae: torch.nn.Module) -> int:
    """Pixels per latent pixel: `spatial_compression_ratio` (AutoencoderDC) or
    2**(len(block_out_channels) - 1) (AutoencoderKL-style configs)."""
    r = getattr(vae, "spatial_compression_ratio", None)
    if r:
        return int(r)
    cfg = getattr(vae, "config", None)
    blocks = getattr(cfg, "block_out_channels", None) if cfg is not None else None
    if blocks:
        return 2 ** (len(blocks) - 1)
    raise ValueError(f"cannot tell the downsampling factor of {type(vae).__name__}; pass stride= explicitly")


def vae_scaling(vae: torch.nn.Module) -> tuple[float, float]:
    """(scaling_factor, shift_factor) from the VAE's config; latent = (z - shift) * scale."""
    cfg = getattr(vae, "config", None)
    scale = getattr(cfg, "scaling_factor", None) if cfg is not None else None
    shift = getattr(cfg, "shift_factor", None) if cfg is not None else None
    return float(1.0 if scale is None else scale), float(0.0 if shift is None else shift)


@torch.inference_mode()
def encode(vae: torch.nn.Module, images: torch.Tensor, *, scaling_factor: float, shift_factor: float = 0.0,
           sample: bool = False) -> torch.Tensor:
    """Encode images [B, 3, H, W] in [-1, 1] to scaled latents [B, C, H/f, W/f] (float32).

    AutoencoderDC returns a deterministic latent; a Gaussian VAE (AutoencoderKL) gives its mode,
    or a sample when `sample`.
    """
    p = next(vae.parameters())
    out = vae.encode(images.to(p.device, p.dtype))
    if hasattr(out, "latent"):
        z = out.latent
    elif hasattr(out, "latent_dist"):
        z = out.latent_dist.sample() if sample else out.latent_dist.mode()
    elif isinstance(out, torch.Tensor):
        z = out
    else:
        z = out[0]
    return (z.float() - shift_factor) * scaling_factor


def _batches(sizes, batch_size: int, max_batch_pixels: int) -> list[list[int]]:
    """Dataset indices grouped by equal (H, W), in chunks of at most `batch_size` images and
    `max_batch_pixels` pixels (at least one image)."""
    groups = collections.defaultdict(list)
    for i, (h, w) in enumerate(sizes.tolist()):
        groups[(h, w)].append(i)
    out = []
    for (h, w), idx in sorted(groups.items()):
        per = max(1, min(batch_size, max_batch_pixels // (h * w)))
        out.extend(idx[k:k + per] for k in range(0, len(idx), per))
    return out


def _stack(items):
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


def extract_latents(data_dir: str, out_dir: str, *, vae: Union[str, torch.nn.Module] = DEFAULT_VAE,
                    vae_class: Optional[str] = None, max_area: Optional[int] = 2048 * 2048, stride: Optional[int] = None,
                    scaling_factor: Optional[float] = None, shift_factor: Optional[float] = None,
                    batch_size: int = 16, max_batch_pixels: int = 16 * 512 * 512, shard_size: int = 1024,
                    device: Union[str, torch.device, None] = None, vae_dtype: torch.dtype = torch.float32,
                    latent_dtype: torch.dtype = torch.float16, num_workers: int = 0, skip_small: bool = False,
                    overwrite: bool = False, progress: bool = True) -> dict:
    """Encode every image of an image folder (root/<class>/<image>) into a latent folder.

    Args:
        data_dir: ImageNet-layout image folder.
        out_dir: the latent folder to write (see `nit_model.data.latents`).
        vae: a diffusers autoencoder, or a name / local path for `load_vae`.
        max_area: NiT's area cap in pixels (None: no cap).
        stride: pixel multiple the images are cropped to; defaults to the VAE's downsampling factor.
        scaling_factor, shift_factor: override the VAE config's values.
        batch_size, max_batch_pixels: images per encoder call (all of one size), and their pixel cap.
        shard_size: latents per safetensors shard.
        device: where the VAE runs (default: cuda if available, else cpu).
        vae_dtype: dtype of the VAE weights and inputs; latent_dtype: storage dtype of the latents.
        num_workers: DataLoader processes decoding images.
        skip_small: leave out images smaller than one stride instead of raising.
        overwrite: replace an existing latent folder at out_dir.
        progress: show a tqdm progress bar.
    Returns:
        a summary dict (items, shards, seconds, latent channels, out_dir, skipped files).
    """
    if not os.path.isdir(data_dir):  # before loading the autoencoder (seconds, or a download attempt)
        raise FileNotFoundError(f"the image folder {data_dir} does not exist")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    vae_name = vae if isinstance(vae, str) else type(vae).__name__
    if isinstance(vae, str):
        vae = load_vae(vae, vae_class=vae_class, device=device, dtype=vae_dtype)
    else:
        vae = vae.to(device=device, dtype=vae_dtype).eval()
    factor = vae_downsample_factor(vae)
    stride = factor if stride is None else int(stride)
    if stride % factor:
        raise ValueError(f"stride={stride} must be a multiple of the VAE's downsampling factor {factor}")
    scale0, shift0 = vae_scaling(vae)
    scale = scale0 if scaling_factor is None else float(scaling_factor)
    shift = shift0 if shift_factor is None else float(shift_factor)

    ds = ImageFolderDataset(data_dir, stride=stride, max_area=max_area, skip_small=skip_small, progress=progress)
    batches = _batches(ds.sizes(), batch_size, max_batch_pixels)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=batches, num_workers=num_workers, collate_fn=_stack)
    meta = dict(vae=vae_name, vae_class=type(vae).__name__, scaling_factor=scale, shift_factor=shift,
                downsample_factor=factor, stride=stride, max_area=max_area, classes=ds.classes,
                source=os.path.abspath(data_dir))
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(ds), desc="encoding", unit="img")
    t0 = time.perf_counter()
    channels = None
    with LatentWriter(out_dir, shard_size=shard_size, dtype=latent_dtype, meta=meta, overwrite=overwrite) as writer:
        for idx, (images, labels) in zip(batches, loader):
            z = encode(vae, images, scaling_factor=scale, shift_factor=shift)
            channels = int(z.shape[1])
            for j, i in enumerate(idx):
                writer.add(i, z[j], int(labels[j]), os.path.relpath(ds.samples[i][0], data_dir))
            if bar is not None:
                bar.update(len(idx))
    if bar is not None:
        bar.close()
    return dict(items=len(ds), shards=writer.num_shards, channels=channels, seconds=time.perf_counter() - t0,
                out_dir=os.path.abspath(out_dir), skipped=[p for p, _ in ds.skipped])


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``nit extract-latents`` (for the `nit` CLI and this module's `main`)."""
    p.add_argument("--data", required=True, help="image folder, ImageNet layout: DATA/<class>/<image>")
    p.add_argument("--out", required=True, help="latent folder to write (safetensors shards + index.jsonl)")
    p.add_argument("--vae", default=DEFAULT_VAE, help=f"diffusers autoencoder name or local path (default {DEFAULT_VAE})")
    p.add_argument("--vae-class", default=None, help="diffusers class (default: from the folder's config, else AutoencoderDC)")
    p.add_argument("--max-area", type=int, default=2048 * 2048, help="area cap in pixels; 0 disables it (default 2048^2)")
    p.add_argument("--stride", type=int, default=None, help="crop sides to multiples of this (default: the VAE factor)")
    p.add_argument("--scaling-factor", type=float, default=None, help="override the VAE config's scaling factor")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-batch-pixels", type=int, default=16 * 512 * 512)
    p.add_argument("--shard-size", type=int, default=1024)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--vae-dtype", choices=sorted(_DTYPES), default="float32")
    p.add_argument("--latent-dtype", choices=sorted(_DTYPES), default="float16")
    p.add_argument("--num-workers", type=int, default=4)
    p.add_argument("--skip-small", action="store_true", help="leave out images smaller than one stride")
    p.add_argument("--overwrite", action="store_true", help="replace an existing latent folder")
    p.add_argument("--no-progress", action="store_true")
    return p


def run(args: argparse.Namespace) -> dict:
    """Run `extract_latents` from parsed `add_arguments` options and print the summary."""
    summary = extract_latents(
        args.data, args.out, vae=args.vae, vae_class=args.vae_class, max_area=args.max_area or None, stride=args.stride,
        scaling_factor=args.scaling_factor, batch_size=args.batch_size, max_batch_pixels=args.max_batch_pixels,
        shard_size=args.shard_size, device=args.device, vae_dtype=_DTYPES[args.vae_dtype],
        latent_dtype=_DTYPES[args.latent_dtype], num_workers=args.num_workers, skip_small=args.skip_small,
        overwrite=args.overwrite, progress=not args.no_progress)
    print(f"wrote {summary['items']} latents ({summary['channels']} channels) in {summary['shards']} shard(s) to "
          f"{summary['out_dir']} in {summary['seconds']:.1f} s" +
          (f"; skipped {len(summary['skipped'])} small image(s)" if summary["skipped"] else ""))
    return summary


def main(argv=None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="nit extract-latents", description=__doc__.splitlines()[0]))
    run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
