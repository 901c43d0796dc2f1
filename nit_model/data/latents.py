"""Pre-extracted latents: safetensors shards plus a JSON-lines index.

Layout of a latent folder::

    index.jsonl                  one line per item, in dataset order:
                                 {"index": i, "shard": "shard-00000.safetensors", "key": "i",
                                  "h": h, "w": w, "label": y, "path": "<source image>"}
    meta.json                    {"format": "nit-latents-v1", "num_items", "channels", "dtype",
                                  "classes", ...whatever the writer was given (VAE, scaling, stride)}
    shard-00000.safetensors ...  tensors [C, h, w] keyed by `key`

h, w are the latent's spatial size (image size / VAE factor). Every file is written to a
temporary name and renamed into place, and the index is written last: a folder with an
`index.jsonl` is a finished extraction.
"""
from __future__ import annotations

import glob
import json
import os
from typing import Optional

import numpy as np
import torch

from ..atomic import atomic_save, atomic_write_text

__all__ = ["LatentWriter", "LatentDataset", "INDEX_NAME", "META_NAME", "FORMAT"]

INDEX_NAME = "index.jsonl"
META_NAME = "meta.json"
FORMAT = "nit-latents-v1"
_SHARD_GLOB = "shard-*.safetensors"
_FIELDS = ("index", "shard", "key", "h", "w", "label", "path")


class LatentWriter:
    """Write latents [C, h, w] into safetensors shards of `shard_size` items and an index.

    Use as a context manager (or call `close()`): ``with LatentWriter(out) as w: w.add(i, z, y, path)``.
    `close()` writes the last shard, then `meta.json`, then `index.jsonl` sorted by item index.
    If the block raises, the index is not written (the folder stays marked unfinished).

    Args:
        out_dir: created if missing; must not hold a previous extraction unless `overwrite`
            (which deletes its index, meta and shard files first).
        shard_size: items per shard.
        dtype: storage dtype of the latents (float16 halves the size of float32; scaled VAE
            latents are of order 1, well inside float16's range).
        meta: extra JSON-serialisable fields for meta.json (VAE name, scaling factor, stride...).
    """

    def __init__(self, out_dir: str, *, shard_size: int = 1024, dtype: torch.dtype = torch.float16,
                 meta: Optional[dict] = None, overwrite: bool = False):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.out_dir, self.shard_size, self.dtype = str(out_dir), int(shard_size), dtype
        self.meta = dict(meta or {})
        os.makedirs(self.out_dir, exist_ok=True)
        old = [p for p in (os.path.join(self.out_dir, INDEX_NAME), os.path.join(self.out_dir, META_NAME)) if os.path.exists(p)]
        old += sorted(glob.glob(os.path.join(self.out_dir, _SHARD_GLOB)))
        if old and not overwrite:
            raise FileExistsError(f"{self.out_dir!r} already holds latents ({os.path.basename(old[0])}, ...); "
                                  f"pass overwrite=True to replace them")
        for p in old:
            os.remove(p)
        self._rows: list[tuple] = []
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_rows: list[tuple] = []
        self._num_shards = 0
        self._seen: set[int] = set()
        self._channels: Optional[int] = None
        self.closed = False

    @property
    def num_shards(self) -> int:
        return self._num_shards

    @property
    def num_items(self) -> int:
        return len(self._seen)

    def add(self, index: int, latent: torch.Tensor, label: int, path: str = "") -> None:
        """Queue item `index` (its dataset index) with latent [C, h, w], class `label`, source `path`."""
        if self.closed:
            raise RuntimeError("LatentWriter is closed")
        if latent.dim() != 3:
            raise ValueError(f"a latent must be [C, h, w], got shape {tuple(latent.shape)}")
        if self._channels is None:
            self._channels = int(latent.shape[0])
        elif latent.shape[0] != self._channels:
            raise ValueError(f"latent of item {index} has {latent.shape[0]} channels, earlier ones {self._channels}")
        index = int(index)
        if index in self._seen:
            raise ValueError(f"item {index} was added twice")
        self._seen.add(index)
        key = str(index)
        self._pending[key] = latent.detach().to("cpu", self.dtype).contiguous()
        self._pending_rows.append((index, key, int(latent.shape[1]), int(latent.shape[2]), int(label), str(path)))
        if len(self._pending) >= self.shard_size:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        from safetensors.torch import save_file

        name = f"shard-{self._num_shards:05d}.safetensors"
        path = os.path.join(self.out_dir, name)
        atomic_save(path, lambda tmp: save_file(self._pending, tmp, metadata={"format": FORMAT}))
        self._rows.extend((i, name, k, h, w, y, p) for i, k, h, w, y, p in self._pending_rows)
        self._num_shards += 1
        self._pending, self._pending_rows = {}, []

    def close(self) -> None:
        """Write the last shard, meta.json and index.jsonl (in that order)."""
        if self.closed:
            return
        self._flush()
        self._rows.sort(key=lambda r: r[0])
        meta = dict(self.meta, format=FORMAT, num_items=len(self._rows), channels=self._channels,
                    dtype=str(self.dtype).replace("torch.", ""), num_shards=self._num_shards)
        atomic_write_text(os.path.join(self.out_dir, META_NAME), json.dumps(meta, indent=1) + "\n")
        lines = [json.dumps(dict(zip(_FIELDS, r))) for r in self._rows]
        atomic_write_text(os.path.join(self.out_dir, INDEX_NAME), "\n".join(lines) + ("\n" if lines else ""))
        self.closed = True

    def __enter__(self) -> "LatentWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.closed = True


class LatentDataset(torch.utils.data.Dataset):
    """Read a latent folder written by `LatentWriter` (e.g. by `nit_model.extract_latents`).

    Item i is ``(latent, label)``: latent [C, h, w] in `dtype` (float32 by default), label int.
    `sizes()` gives every (h, w) from the index without opening a shard. Shards are memory-mapped
    lazily, once per process (DataLoader workers open their own).
    """

    def __init__(self, root: str, *, dtype: torch.dtype = torch.float32):
        self.root, self.dtype = str(root), dtype
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"latent folder {self.root!r} does not exist")
        index_path = os.path.join(self.root, INDEX_NAME)
        if not os.path.exists(index_path):
            raise FileNotFoundError(f"no {INDEX_NAME} in {self.root!r}: not a latent folder, or its extraction did not finish")
        meta_path = os.path.join(self.root, META_NAME)
        self.meta = {}
        if os.path.exists(meta_path):
            with open(meta_path) as f:
                self.meta = json.load(f)
        rows = []
        with open(index_path) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    r = json.loads(line)
                    rows.append((r["shard"], r["key"], int(r["h"]), int(r["w"]), int(r["label"]), r.get("path", "")))
                except (ValueError, KeyError, TypeError) as e:
                    raise ValueError(f"{index_path}:{n}: bad index line ({type(e).__name__}: {e}): {line.strip()[:200]}") from None
        if not rows:
            raise ValueError(f"{index_path} lists no items")
        self._shard = [r[0] for r in rows]
        self._key = [r[1] for r in rows]
        self._sizes = np.asarray([(r[2], r[3]) for r in rows], dtype=np.int64)
        self._labels = np.asarray([r[4] for r in rows], dtype=np.int64)
        self._paths = [r[5] for r in rows]
        missing = sorted({s for s in self._shard if not os.path.exists(os.path.join(self.root, s))})
        if missing:
            raise FileNotFoundError(f"{self.root!r}: the index names shard(s) that are missing: {', '.join(missing[:5])}")
        self.classes = list(self.meta.get("classes") or [])
        self._handles: dict = {}

    @property
    def num_classes(self) -> int:
        return len(self.classes) if self.classes else int(self._labels.max()) + 1

    @property
    def channels(self) -> Optional[int]:
        return self.meta.get("channels")

    def __len__(self) -> int:
        return len(self._key)

    def sizes(self) -> np.ndarray:
        """int64 [M, 2], latent (h, w) of every item."""
        return self._sizes.copy()

    def labels(self) -> np.ndarray:
        return self._labels.copy()

    def source_path(self, index: int) -> str:
        return self._paths[index]

    def _open(self, shard: str):
        h = self._handles.get(shard)
        if h is None:
            from safetensors import safe_open

            h = safe_open(os.path.join(self.root, shard), framework="pt")
            self._handles[shard] = h
        return h

    def __getitem__(self, index) -> tuple[torch.Tensor, int]:
        shard, key = self._shard[index], self._key[index]
        z = self._open(shard).get_tensor(key)
        h, w = self._sizes[index].tolist()
        if z.dim() != 3 or tuple(z.shape[1:]) != (h, w):
            raise ValueError(f"{shard}[{key}] has shape {tuple(z.shape)}, the index says [C, {h}, {w}]")
        return z.to(self.dtype), int(self._labels[index])

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_handles"] = {}  # open shards do not travel to worker processes
        return state

    def __repr__(self) -> str:
        return f"LatentDataset({self.root!r}, {len(self)} items, channels={self.channels}, {len(set(self._shard))} shards)"
