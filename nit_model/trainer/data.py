"""The training data stream: dataset, token-budget packs per rank, and a resumable position.

The stream is a deterministic function of (config, rank, world size): PackedBatchSampler plans
LPFHP packs once and deals them per epoch from (seed, epoch); rank r takes packs r, r+W, ... The
trainer counts the packs it consumed, so the state (epoch, position in the epoch) restores the
exact stream, whatever the DataLoader prefetched.
"""
from __future__ import annotations

from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..data import LatentDataset, PackCollate, PackedBatch, ShapesDataset
from ..packing import PackedBatchSampler, token_lengths
from .config import ConfigError, TrainConfig

__all__ = ["build_dataset", "check_dataset", "ResumableSampler", "PackStream"]


def build_dataset(cfg: TrainConfig):
    """The dataset the config names; missing folders and unreadable data raise before any work."""
    d, nit = cfg.data, cfg.nit_config()
    if d.kind == "shapes":
        return ShapesDataset(d.num_items, seed=d.shapes_seed, min_side=d.min_side, max_side=d.max_side,
                             max_aspect=d.max_aspect, stride=nit.patch_size, palette=d.shapes_palette)
    if d.kind == "latents":
        try:
            return LatentDataset(d.path)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"data.path: {e}") from None
    from ..data import ImageFolderDataset  # PIL only when images are used
    try:
        return ImageFolderDataset(d.path, stride=nit.patch_size, max_area=d.max_area)
    except (FileNotFoundError, NotADirectoryError, ValueError) as e:
        raise ConfigError(f"data.path: {e}") from None


def check_dataset(ds, cfg: TrainConfig) -> np.ndarray:
    """Check the dataset against the model; return the token count of every item.

    Channels must equal model.in_channels, every side must hold at least one patch (and be a
    multiple of the patch), labels must lie in [0, model.num_classes).
    """
    nit = cfg.nit_config()
    p = nit.patch_size
    channels = getattr(ds, "channels", None)
    if channels is None and isinstance(ds, ShapesDataset):
        channels = 3
    if channels is None and len(ds):
        channels = int(ds[0][0].shape[0])
    if channels is not None and int(channels) != nit.in_channels:
        raise ConfigError(f"the data has {channels} channels but model.in_channels={nit.in_channels}")
    sizes = ds.sizes()
    small = np.flatnonzero((sizes < p).any(axis=1))
    if small.size:
        i = int(small[0])
        raise ConfigError(f"item {i} of the data is {sizes[i, 0]}x{sizes[i, 1]}, smaller than one patch "
                          f"(model.patch_size={p}) in a side ({small.size} such items)")
    try:
        lengths = token_lengths(sizes, p)
    except ValueError as e:
        raise ConfigError(f"data: {e}") from None
    labels = ds.labels()
    if len(labels) and (labels.min() < 0 or labels.max() >= nit.num_classes):
        bad = int(labels.min() if labels.min() < 0 else labels.max())
        raise ConfigError(f"the data has class id {bad}, outside [0, model.num_classes={nit.num_classes})")
    return lengths


class ResumableSampler(torch.utils.data.Sampler):
    """This rank's packs of one epoch of a PackedBatchSampler, from position `start` on."""

    def __init__(self, base: PackedBatchSampler):
        self.base, self.epoch, self.start = base, 0, 0

    def set_position(self, epoch: int, start: int) -> None:
        self.epoch, self.start = int(epoch), int(start)

    def __iter__(self) -> Iterator[list]:
        for p in self.base.rank_packs(self.epoch)[self.start:]:
            yield p.tolist()

    def __len__(self) -> int:
        return max(len(self.base) - self.start, 0)


class PackStream:
    """Endless iterator of PackedBatch over epochs; ``state()`` is where the next pack comes from."""

    def __init__(self, ds, lengths: np.ndarray, cfg: TrainConfig, rank: int, world_size: int,
                 pin_memory: bool = False):
        d = cfg.data
        try:
            base = PackedBatchSampler(lengths, d.token_budget, method=d.packing, shuffle=d.shuffle, seed=cfg.train.seed,
                                      rank=rank, world_size=world_size, drop_oversized=d.drop_oversized,
                                      max_items=d.max_items)
        except ValueError as e:
            raise ConfigError(f"data: {e}") from None
        self.base = base
        self.sampler = ResumableSampler(base)
        self.loader = DataLoader(ds, batch_sampler=self.sampler, collate_fn=PackCollate(cfg.nit_config().patch_size),
                                 num_workers=d.num_workers, pin_memory=pin_memory,
                                 persistent_workers=d.num_workers > 0)
        self.epoch, self.pos = 0, 0
        self._it: Optional[Iterator] = None

    @property
    def packs_per_epoch(self) -> int:
        return len(self.base)

    def state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._it = None

    def __iter__(self) -> "PackStream":
        return self

    def __next__(self) -> PackedBatch:
        for _ in range(2):
            if self._it is None:
                self.sampler.set_position(self.epoch, self.pos)
                self._it = iter(self.loader)
            try:
                batch = next(self._it)
            except StopIteration:
                self._it = None
                self.epoch, self.pos = self.epoch + 1, 0
                continue
            self.pos += 1
            return batch
        raise RuntimeError("the data stream yielded nothing for a whole epoch")
