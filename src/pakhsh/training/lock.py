"""One writer per run folder: an exclusive flock on `<run>/train.lock`, which records who holds it.

The kernel drops a flock when its holder exits, however it exits (even SIGKILL), so a crashed run never leaves a
stale lock behind; the file itself stays (deleting it would let a third process lock a fresh inode while the second
still holds the old one).
"""

from __future__ import annotations

import errno
import os
import socket
import tempfile
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock; runs are then not protected against a second writer
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = "train.lock"


class RunLockedError(RuntimeError):
    """Another process is training into the same run folder."""


class RunFolderError(RuntimeError):
    """The run folder cannot be created or written."""


class RunLock:
    """Held from `acquire()` to `release()`; the lock file holds "pid host" of the holder."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock or raise at once (never wait: a second trainer should stop, not queue)."""
        if self._fd is not None:
            return
        fd = _open_writable(self.path)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                raise RunLockedError(
                    f"{self.path.parent} is in use by another `pakhsh train` ({_holder(self.path)}); "
                    "wait for it to finish, stop it, or train into another --out folder"
                ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # no holder any more; the flock goes with the close
        finally:
            os.close(fd)

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:  # a Trainer dropped without fit() must not keep its folder locked
        try:
            self.release()
        except Exception:  # interpreter shutdown
            pass


def _open_writable(path: Path) -> int:
    """Create the run folder and open the lock file, turning permission problems into one clear line."""
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise _not_writable(folder, e) from None
    try:
        check_writable(folder)
    except RunFolderError:
        os.close(fd)
        raise
    return fd


def check_writable(folder: Path) -> None:
    """Create and remove a file in `folder` and in the subfolders a run writes to (where they exist already):
    an existing lock file opens read-write even in a read-only folder, so opening it proves nothing."""
    for d in (folder, folder / "checkpoints", folder / "samples"):
        if not d.is_dir():
            continue
        try:
            fd, name = tempfile.mkstemp(dir=d, prefix=".pakhsh-write-test-")
            os.close(fd)
            os.unlink(name)
        except OSError as e:
            raise _not_writable(d, e) from None


def _not_writable(folder: Path, e: OSError) -> RunFolderError:
    why = (e.strerror or type(e).__name__).lower()
    return RunFolderError(f"cannot write to the run folder {folder} ({why}); choose a writable --out folder")


def _holder(path: Path) -> str:
    """'pid 1234 on host-a' from the lock file (best effort: it may be mid-write)."""
    try:
        pid, host = path.read_text().split()[:2]
        return f"pid {pid} on {host}"
    except (OSError, ValueError):
        return "pid unknown"
