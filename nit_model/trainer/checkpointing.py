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
when the next trainer starts in the run directory (it holds the run's lock, see
`nit_model.trainer.rundir`, so no other trainer can be writing them).

Each checkpoint also holds ``manifest.json``: the size and sha256 of every file, written last into
the temporary directory. Loading verifies it (`verify_checkpoint`); a checkpoint whose files are
damaged (e.g. truncated by a full disk after the rename) is skipped in favour of the previous
complete one, with a warning, and the trainer moves it aside to ``corrupt-<name>``. Files get one
mode, 0o666 minus the umask. ``nit ckpt list|verify`` shows the state of a run directory.

For tests only: NIT_TEST_CHECKPOINT_PAUSE_S=<seconds> sleeps after each file written into the
temporary directory, so that a test can kill a trainer mid-checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import sys
import time
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ..atomic import TMP_PREFIX as _TMP_PREFIX
from ..atomic import atomic_write_text, file_mode, fsync_path

__all__ = ["CKPT_FILES", "LATEST", "MANIFEST", "verify_checkpoint", "clean_debris", "file_mode", "CheckpointNotFound", "checkpoint_name", "save_checkpoint", "list_checkpoints",
           "resolve_checkpoint", "is_complete", "rng_state", "set_rng_state", "load_pt", "fsync_path"]

CKPT_FILES = ("model.safetensors", "ema.safetensors", "optimizer.pt", "trainer.pt", "config.yaml")
LATEST = "latest"
MANIFEST = "manifest.json"
_STEP_RE = re.compile(r"^step-(\d+)$")
CORRUPT_PREFIX = "corrupt-"


class CheckpointNotFound(FileNotFoundError):
    """No complete checkpoint where one was asked for."""


def checkpoint_name(step: int) -> str:
    return f"step-{int(step):08d}"


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _write_manifest(folder: str, step: int, names: Sequence[str]) -> None:
    files = {n: {"bytes": os.path.getsize(os.path.join(folder, n)), "sha256": sha256_file(os.path.join(folder, n))}
             for n in names}
    path = os.path.join(folder, MANIFEST)
    with open(path, "w") as f:
        json.dump({"step": int(step), "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def verify_checkpoint(path: str, *, checksums: bool = True) -> list[str]:
    """What is wrong with the checkpoint directory `path` (empty when nothing): missing files, and
    sizes or sha256 that differ from its manifest. A checkpoint without a manifest (written by an
    older version) is checked for its files only."""
    problems = [f"{n} is missing" for n in CKPT_FILES if not os.path.isfile(os.path.join(path, n))]
    mpath = os.path.join(path, MANIFEST)
    if problems or not os.path.exists(mpath):
        return problems
    try:
        with open(mpath) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"{MANIFEST} is unreadable ({type(e).__name__}: {e})"]
    for name, want in files.items():
        fp = os.path.join(path, name)
        if not os.path.isfile(fp):
            problems.append(f"{name} is missing")
            continue
        size = os.path.getsize(fp)
        if size != want.get("bytes"):
            problems.append(f"{name} has {size} bytes, the manifest says {want.get('bytes')}")
        elif checksums and sha256_file(fp) != want.get("sha256"):
            problems.append(f"{name} does not match its sha256 in the manifest")
    return problems


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def set_aside(path: str, prefix: str = CORRUPT_PREFIX) -> str:
    """Rename a checkpoint directory to <prefix><name> beside it (a free name); returns the new path."""
    root, name = os.path.split(os.path.abspath(path))
    dest, k = os.path.join(root, prefix + name), 1
    while os.path.exists(dest):
        dest, k = os.path.join(root, f"{prefix}{name}.{k}"), k + 1
    os.rename(path, dest)
    return dest


def clean_debris(root: str) -> list[str]:
    """Remove what interrupted saves and prunes leave under a checkpoints folder (temporary
    directories and pointer files); call only while holding the run's lock. Returns the names."""
    if not os.path.isdir(root):
        return []
    gone = []
    for name in os.listdir(root):
        m = re.match(rf"^{re.escape(_TMP_PREFIX)}old-(step-\d+)-\d+$", name)
        if m and is_complete(os.path.join(root, name)) and not os.path.exists(os.path.join(root, m.group(1))):
            os.rename(os.path.join(root, name), os.path.join(root, m.group(1)))  # killed between the two renames
            continue
        if name.startswith(_TMP_PREFIX) or name.startswith(LATEST + _TMP_PREFIX):
            p = os.path.join(root, name)
            shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else os.remove(p)
            gone.append(name)
    return gone


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
        pause = float(os.environ.get("NIT_TEST_CHECKPOINT_PAUSE_S", "0") or 0)  # tests only (see above)
        mode = file_mode()
        for name, write in writers:
            path = os.path.join(tmp, name)
            write(path)
            os.chmod(path, mode)  # one mode for all (safetensors come from mkstemp, 0o600)
            fsync_path(path)
            if pause:
                time.sleep(pause)
        _write_manifest(tmp, step, names)
        os.chmod(os.path.join(tmp, MANIFEST), mode)
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
    atomic_write_text(os.path.join(root, LATEST), os.path.basename(final) + "\n")
    if keep_last is not None:
        for _, path in list_checkpoints(root)[:-keep_last]:
            if os.path.abspath(path) != os.path.abspath(final):
                # renamed first: a kill during the deletion leaves debris, never a half step-* folder
                doomed = os.path.join(root, f"{_TMP_PREFIX}prune-{os.path.basename(path)}-{os.getpid()}")
                os.rename(path, doomed)
                shutil.rmtree(doomed, ignore_errors=True)
    return final


def _latest_in(root: str) -> Optional[str]:
    """The newest complete checkpoint under `root` (the `latest` pointer, else the highest step)."""
    pointer = os.path.join(root, LATEST)
    if os.path.isfile(pointer):
        with open(pointer) as f:
            name = f.read().strip()
        path = os.path.join(root, name)
        if _STEP_RE.match(name) and is_complete(path):
            return path
    found = list_checkpoints(root)  # no pointer, or it names a checkpoint that was deleted
    return found[-1][1] if found else None


def newest_verified(root: str, *, quarantine: bool = False, warn: Callable[[str], None] = _warn) -> Optional[str]:
    """The newest complete checkpoint under `root` whose files verify; damaged ones are skipped
    with a warning and, with `quarantine`, renamed to corrupt-<name> (hold the run's lock)."""
    first = _latest_in(root)
    order = [first] if first else []
    order += [p for _, p in reversed(list_checkpoints(root)) if p != first]
    for path in order:
        problems = verify_checkpoint(path)
        if not problems:
            return path
        msg = f"checkpoint {path} is damaged ({'; '.join(problems)})"
        if quarantine:
            msg += f"; moved to {set_aside(path)}"
        warn(msg + "; falling back to the previous complete checkpoint")
    return None


def resolve_checkpoint(spec: str, run_dir: Optional[str] = None, *, quarantine: bool = False,
                       warn: Callable[[str], None] = _warn) -> str:
    """The checkpoint directory that `spec` names, verified (see verify_checkpoint).

    spec: "latest" (the newest complete checkpoint of `run_dir`), a checkpoint directory, a
    run directory or its ``checkpoints`` folder (their newest complete checkpoint). Damaged
    checkpoints of a run are skipped with a warning (moved aside with `quarantine`); a damaged
    checkpoint named directly raises CheckpointNotFound.
    """
    if spec == "latest":
        if run_dir is None:
            raise CheckpointNotFound("resume='latest' needs the run directory (out_dir)")
        path = newest_verified(os.path.join(run_dir, "checkpoints"), quarantine=quarantine, warn=warn)
        if path is None:
            raise CheckpointNotFound(f"resume='latest': no complete checkpoint under {os.path.join(run_dir, 'checkpoints')}")
        return path
    spec = os.fspath(spec)
    if not os.path.exists(spec):
        raise CheckpointNotFound(f"resume: {spec!r} does not exist")
    if is_complete(spec):
        problems = verify_checkpoint(spec)
        if problems:
            raise CheckpointNotFound(f"checkpoint {spec} is damaged: {'; '.join(problems)}")
        return spec
    for root in (spec, os.path.join(spec, "checkpoints")):
        path = newest_verified(root, quarantine=quarantine, warn=warn) if os.path.isdir(root) else None
        if path is not None:
            return path
    missing = [f for f in CKPT_FILES if not os.path.isfile(os.path.join(spec, f))]
    raise CheckpointNotFound(f"resume: {spec!r} is not a complete checkpoint (missing {', '.join(missing)}) "
                             f"and holds no complete, undamaged checkpoints/step-* directory")


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
