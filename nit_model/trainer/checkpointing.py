"""Training checkpoints: atomic directories, a `latest` pointer, keep-last-N, exact resume state.

Layout under ``<run>/checkpoints/``::

    step-00000500/
        model.safetensors     the trained weights (NiTConfig in the metadata; load_model reads it)
        ema.safetensors       the EMA weights, same format
        optimizer.pt          AdamW state dict (tensors and numbers only)
        trainer.pt            step, epoch, position in the epoch, RNG states, sampler state, ...
        config.yaml           the TrainConfig of the run
    latest                    one line: the name of the newest complete checkpoint

Every ``.pt`` file holds only tensors, numbers, strings and containers of them, so it loads with
``torch.load(weights_only=True)`` (no arbitrary pickles). A checkpoint is written into a hidden
temporary directory, each file fsync'ed, then the directory is renamed into place and the parent
fsync'ed; only then is ``latest`` replaced (write, fsync, rename). A crash at any point leaves
either the previous state or the new complete checkpoint: a partial one is never named
``step-*`` nor pointed to by ``latest``. Leftover temporary directories are ignored and removed
by the next save.
"""
from __future__ import annotations

import os
import random
import re
import shutil
from typing import Callable, Optional, Sequence

import numpy as np
import torch

__all__ = ["CKPT_FILES", "LATEST", "CheckpointNotFound", "checkpoint_name", "save_checkpoint", "list_checkpoints",
           "resolve_checkpoint", "is_complete", "rng_state", "set_rng_state", "load_pt", "fsync_path"]

CKPT_FILES = ("model.safetensors", "ema.safetensors", "optimizer.pt", "trainer.pt", "config.yaml")
LATEST = "latest"
_STEP_RE = re.compile(r"^step-(\d+)$")
_TMP_PREFIX = ".tmp-"


class CheckpointNotFound(FileNotFoundError):
    """No complete checkpoint where one was asked for."""


def checkpoint_name(step: int) -> str:
    return f"step-{int(step):08d}"


def fsync_path(path: str) -> None:
    """Flush a file's or a directory's data and metadata to disk."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if os.path.isdir(path) else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_text_atomic(path: str, text: str) -> None:
    tmp = f"{path}{_TMP_PREFIX}{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(os.path.dirname(os.path.abspath(path)))


def is_complete(path: str) -> bool:
    """True when `path` is a checkpoint directory holding every file of CKPT_FILES."""
    return os.path.isdir(path) and all(os.path.isfile(os.path.join(path, f)) for f in CKPT_FILES)


def list_checkpoints(root: str) -> list[tuple[int, str]]:
    """(step, path) of the complete checkpoints under `root`, oldest first."""
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        m = _STEP_RE.match(name)
        path = os.path.join(root, name)
        if m and is_complete(path):
            out.append((int(m.group(1)), path))
    return sorted(out)


def save_checkpoint(root: str, step: int, writers: Sequence[tuple[str, Callable[[str], None]]],
                    keep_last: Optional[int] = None) -> str:
    """Write a checkpoint atomically and return its path.

    writers: (file name, fn(path)) pairs; each fn writes one file. The names must cover CKPT_FILES.
    keep_last: afterwards delete the oldest complete checkpoints beyond this many (never the new one).
    """
    names = [n for n, _ in writers]
    if sorted(names) != sorted(CKPT_FILES):
        raise ValueError(f"a checkpoint needs exactly the files {', '.join(CKPT_FILES)}, got {', '.join(names)}")
    os.makedirs(root, exist_ok=True)
    for name in os.listdir(root):  # debris of a crash during an earlier save
        if name.startswith(_TMP_PREFIX):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    final = os.path.join(root, checkpoint_name(step))
    tmp = os.path.join(root, f"{_TMP_PREFIX}{checkpoint_name(step)}-{os.getpid()}")
    os.makedirs(tmp)
    try:
        for name, write in writers:
            path = os.path.join(tmp, name)
            write(path)
            fsync_path(path)
        fsync_path(tmp)
        if os.path.exists(final):  # the same step saved again (e.g. a resumed run that ends where it began)
            old = os.path.join(root, f"{_TMP_PREFIX}old-{checkpoint_name(step)}-{os.getpid()}")
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        fsync_path(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_text_atomic(os.path.join(root, LATEST), os.path.basename(final) + "\n")
    if keep_last is not None:
        for _, path in list_checkpoints(root)[:-keep_last]:
            if os.path.abspath(path) != os.path.abspath(final):
                shutil.rmtree(path, ignore_errors=True)
    return final


def _latest_in(root: str) -> Optional[str]:
    pointer = os.path.join(root, LATEST)
    if os.path.isfile(pointer):
        with open(pointer) as f:
            name = f.read().strip()
        path = os.path.join(root, name)
        if _STEP_RE.match(name) and is_complete(path):
            return path
    found = list_checkpoints(root)  # no pointer, or it names a checkpoint that was deleted
    return found[-1][1] if found else None


def resolve_checkpoint(spec: str, run_dir: Optional[str] = None) -> str:
    """The checkpoint directory that `spec` names.

    spec: "latest" (the newest complete checkpoint of `run_dir`), a checkpoint directory, a
    run directory or its ``checkpoints`` folder (their newest complete checkpoint).
    """
    if spec == "latest":
        if run_dir is None:
            raise CheckpointNotFound("resume='latest' needs the run directory (out_dir)")
        path = _latest_in(os.path.join(run_dir, "checkpoints"))
        if path is None:
            raise CheckpointNotFound(f"resume='latest': no complete checkpoint under {os.path.join(run_dir, 'checkpoints')}")
        return path
    spec = os.fspath(spec)
    if not os.path.exists(spec):
        raise CheckpointNotFound(f"resume: {spec!r} does not exist")
    if is_complete(spec):
        return spec
    for root in (spec, os.path.join(spec, "checkpoints")):
        path = _latest_in(root) if os.path.isdir(root) else None
        if path is not None:
            return path
    missing = [f for f in CKPT_FILES if not os.path.isfile(os.path.join(spec, f))]
    raise CheckpointNotFound(f"resume: {spec!r} is not a complete checkpoint (missing {', '.join(missing)}) "
                             f"and holds no checkpoints/step-* directory")


def load_pt(path: str, map_location="cpu"):
    """torch.load with weights_only=True (no arbitrary pickles), with the file named on failure."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: cannot be read as a weights-only torch file: {type(e).__name__}: {e}") from None


# ---------------------------------------------------------------------------------------------
# RNG states as tensors and numbers (weights-only loadable)


def rng_state() -> dict:
    """The global RNG states of torch (CPU and every CUDA device), numpy and Python's random."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_state[0], "state": list(py_state[1]),
                   "gauss_next": py_state[2]},
    }


def set_rng_state(state: dict) -> None:
    """Restore what rng_state() returned."""
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
