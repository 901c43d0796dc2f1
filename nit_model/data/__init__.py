"""Datasets and batching for NiT at native resolution.

Every dataset returns ``(tensor [C, H, W], label)`` with H and W multiples of the model's stride,
and offers ``sizes() -> int64 [M, 2]`` (H, W per item, without loading pixels) for packing::

    from nit_model.data import ShapesDataset, PackCollate
    from nit_model.packing import PackedBatchSampler, token_lengths

    ds = ShapesDataset(10_000, stride=8)                        # or ImageFolderDataset / LatentDataset
    sampler = PackedBatchSampler(token_lengths(ds.sizes(), 8), token_budget=4096, seed=0)
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=PackCollate(8), num_workers=2)
    for epoch in range(E):
        sampler.set_epoch(epoch)
        for batch in loader:                                    # a PackedBatch
            packed = batch.packed()                             # nit_kernels.PackedSeqs
            model(batch.x, t, batch.labels, packed)             # x [N, C, p, p]
"""
from .collate import PackCollate, PackedBatch, collate_packed, patchify, unpatchify, unpatchify_packed
from .folder import IMG_EXTENSIONS, ImageFolderDataset, find_images, load_image, native_resolution
from .latents import LatentDataset, LatentWriter
from .shapes import PALETTES, SHAPE_CLASSES, ShapesDataset, render_shape

__all__ = [
    "PackCollate", "PackedBatch", "collate_packed", "patchify", "unpatchify", "unpatchify_packed",
    "IMG_EXTENSIONS", "ImageFolderDataset", "find_images", "load_image", "native_resolution",
    "LatentDataset", "LatentWriter",
    "SHAPE_CLASSES", "PALETTES", "ShapesDataset", "render_shape",
]
