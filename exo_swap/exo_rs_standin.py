"""The smallest pure-Python stand-in for exo's Rust bindings `exo_rs` that exo still needs
once its routing runs over p2p-reliable: `Pidfile` and `PidfileError` (exo.main takes the
PID file before anything else; exo's test_pidfile checks it across processes).

Semantics of exo_rs (pidfile-rs, BSD `pidfile_open`): the file is created and locked at
once (flock, exclusive, non-blocking); a second holder gets `PidfileError` naming the pid
written there; `write()` writes this process's pid; `close()` and garbage collection remove
the file and release the lock.

Standard library only: `apply` installs it in an exo checkout as the module `exo_rs`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

__all__ = ["Pidfile", "PidfileError"]


class PidfileError(Exception):
    """The PID file is held by another live process, or cannot be used."""


class Pidfile:
    """A PID file protected with a lock, held while this object lives."""

    def __init__(self, path: str | os.PathLike[str], mode: int) -> None:
        self._fd: int | None = None
        self._path = Path(path)
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            for _ in range(10):  # the holder may remove the file between open and lock
                fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, mode)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
                    os.close(fd)
                    raise PidfileError(
                        f"daemon already running with PID {holder or 'unknown'} ({self._path})"
                    ) from None
                if _same_file(fd, self._path):
                    self._fd = fd
                    return
                os.close(fd)  # locked a file that was unlinked meanwhile: try again
        except OSError as exc:
            raise PidfileError(f"cannot open PID file {self._path}: {exc}") from exc
        raise PidfileError(f"cannot lock PID file {self._path}: it keeps being replaced")

    def write(self) -> None:
        """Write this process's id (the file is truncated first)."""
        fd = self._held()
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        except OSError as exc:
            raise PidfileError(f"cannot write PID file {self._path}: {exc}") from exc

    def as_raw_fd(self) -> int:
        """The file descriptor (borrowed: valid while this object is open)."""
        return self._held()

    def close(self) -> None:
        """Remove the PID file and release the lock."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            if _same_file(fd, self._path):
                self._path.unlink()
        os.close(fd)

    def __del__(self) -> None:
        self.close()

    def _held(self) -> int:
        if self._fd is None:
            raise PidfileError("cannot use resource after exiting context")
        return self._fd


def _same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = path.stat()
    except OSError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (on_disk.st_dev, on_disk.st_ino)
