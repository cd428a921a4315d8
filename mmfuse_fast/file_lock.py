"""An exclusive hold on a lock file for as long as one process works on what it guards (a run directory, a pack
being written): a non-blocking `flock`, with the holder's pid and host written into the file for the error a
second process gets.

The kernel drops the lock when the holding process ends, however it ends (SIGKILL included), so a lock file left
by a dead process never blocks. Two holds of one file conflict even within one process. The lock is as good as
the filesystem's flock: local filesystems, NFSv4 and Lustre (mounted with flock) honour it across hosts.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

__all__ = ["FileLock", "LockHeld"]


class LockHeld(Exception):
    """Another process holds the lock; `holder` describes it ("pid N on host H"), or is "" before it wrote that."""

    def __init__(self, path: Path, holder: str):
        super().__init__(f"{path} is held{' by ' + holder if holder else ''}")
        self.path, self.holder = path, holder


class FileLock:
    """`acquire` takes the lock on `path` (creating the file) or raises `LockHeld`; OSError for a path that cannot
    be opened or locked. The file names the holder only while there is one."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> FileLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LockHeld(self.path, holder_of(self.path)) from None
        except OSError:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
        os.close(fd)  # drops the lock

    def __enter__(self) -> FileLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def holder_of(path: Path) -> str:
    """"pid N on host H" from a lock file this module wrote, the file's text from any other writer, or ""."""
    try:
        text = path.read_text().strip()
    except OSError:
        return ""
    parts = text.split()
    if len(parts) == 2 and parts[0].isdigit():
        return f"pid {parts[0]} on host {parts[1]}"
    return text
