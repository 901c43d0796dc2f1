"""Atomic file writes: a reader sees the old file or the whole new one, never a part.

Every write goes to a hidden temporary file in the destination's folder (``.tmp-<stem>-<random><ext>``,
the same file system, so the rename below is atomic; the extension is kept for writers that choose a
format by it), which is flushed and fsync'ed, given the mode ``open()`` would give a new file (0o666
minus the umask), and renamed over the destination with ``os.replace``; then the folder is fsync'ed
so that the rename itself survives a power cut. If the writer raises (or the process is interrupted
by an exception), the temporary file is removed and the destination is untouched. A process killed
outright leaves at most a ``.tmp-*`` file beside the destination, never a half-written destination.

    atomic_write_text(path, text)          str, encoded as UTF-8
    atomic_write_bytes(path, data)         bytes
    atomic_save(path, save)                save(tmp_path) writes the file: e.g.
                                           ``lambda p: safetensors.torch.save_file(tensors, p)``
                                           or ``lambda p: torch.save(obj, p)``
"""
from __future__ import annotations

import os
import tempfile
from typing import Callable, Optional, Union

__all__ = ["atomic_write_text", "atomic_write_bytes", "atomic_save", "fsync_path", "file_mode", "TMP_PREFIX"]

PathLike = Union[str, os.PathLike]
TMP_PREFIX = ".tmp-"


def fsync_path(path: PathLike) -> None:
    """Flush a file's or a directory's data and metadata to disk."""
    path = os.fspath(path)
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if os.path.isdir(path) else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_mode() -> int:
    """0o666 minus the process umask: the mode ``open(path, "w")`` gives a new file."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_save(path: PathLike, save: Callable[[str], None]) -> str:
    """Run ``save(tmp)`` to write a temporary file beside `path`, then move it onto `path` atomically.

    `save` receives the temporary path (a str with the extension of `path`) and must write the whole
    file there; it may close the file itself (safetensors, torch.save). The parent folder is created
    when missing. Returns `path` as a str. If `save` raises, `path` keeps its old content (or stays
    absent) and the exception propagates.
    """
    path = os.fspath(path)
    if not path or os.path.isdir(path):
        raise ValueError(f"atomic write: expected the path of a file, got {path!r}")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    stem, ext = os.path.splitext(os.path.basename(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f"{TMP_PREFIX}{stem}-", suffix=ext)
    os.close(fd)
    try:
        save(tmp)
        os.chmod(tmp, file_mode())  # mkstemp creates 0o600
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_path(folder)
    return path


def atomic_write_bytes(path: PathLike, data: bytes) -> str:
    """Write `data` to `path` atomically (see the module docstring); returns `path`."""
    def save(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
    return atomic_save(path, save)


def atomic_write_text(path: PathLike, text: str, *, newline: Optional[str] = None) -> str:
    """Write `text` (UTF-8; `newline` as for ``open``) to `path` atomically; returns `path`."""
    def save(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline=newline) as f:
            f.write(text)
    return atomic_save(path, save)
