"""One trainer per run directory: an exclusive OS lock on ``<run>/.lock``.

``fcntl.flock`` on an open file: held while the descriptor is open, released by the kernel when
the process ends in any way (kill -9 included), so a crash never leaves a stale lock. The file
holds the holder's pid and host for the refusal message. Under DDP only rank 0 takes it.
"""
from __future__ import annotations

import fcntl
import os
import socket
from typing import Optional

from .config import ConfigError

__all__ = ["RunDirLocked", "RunLock", "LOCK_NAME"]

LOCK_NAME = ".lock"


class RunDirLocked(ConfigError):
    """Another process trains in this run directory."""


class RunLock:
    """``with RunLock(out_dir):`` or ``lock = RunLock(out_dir).acquire()`` ... ``lock.release()``."""

    def __init__(self, run_dir: str):
        self.run_dir = os.path.abspath(os.fspath(run_dir))
        self.path = os.path.join(self.run_dir, LOCK_NAME)
        self._fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        """Take the lock at once or raise RunDirLocked naming the holder (pid, host)."""
        os.makedirs(self.run_dir, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "unknown pid"
            os.close(fd)
            raise RunDirLocked(f"{self.run_dir} is in use by another trainer ({holder}); wait for it to end, "
                               f"or choose another --out (out_dir)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
