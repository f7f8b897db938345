"""Files written so that a crash never leaves half of one: atomic replacement, durable renames, free-space checks,
short reasons for failed writes, and the lock that keeps two commands out of one directory."""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from gpt2scratch.errors import OutDirError

LOCK_NAME = ".gpt2scratch.lock"
FREE_SPACE_HINT = "free some space or use another --out-dir"


def check_free_space(folder: Path, needed: int, hint: str = FREE_SPACE_HINT) -> None:
    """OutDirError, with both figures, if ``folder``'s disk has less than ``needed`` bytes (plus 5%) free."""
    free = shutil.disk_usage(folder).free
    if free < needed * 1.05:
        raise OutDirError(
            f"not enough disk space in {folder}: a checkpoint needs {needed / 1e9:.2f} GB, {free / 1e9:.2f} GB free; "
            f"{hint}"
        )


def replace_atomically(
    path: Path, nbytes: int, write: Callable[[Path], None], space_hint: str = FREE_SPACE_HINT
) -> None:
    """Have ``write`` fill a temporary file beside ``path`` (and fsync it), then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    check_free_space(path.parent, nbytes, space_hint)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        raise OutDirError(
            f"could not write {path}: {write_failure_reason(err)}; the previous files are intact"
        ) from err
    finally:
        tmp.unlink(missing_ok=True)  # renamed away after a success; after any failure or a stop, ours to remove
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    """Make the renames in ``folder`` durable: without this a crash can lose a rename that already returned."""
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_failure_reason(err: BaseException) -> str:
    """A short reason for a failed write, RuntimeErrors from torch's writer included."""
    # torch's writer reports a failed write() as a RuntimeError ("unexpected pos ..."); the OSError that says why
    # (disk full, file too large) is its __context__.
    while not isinstance(err, OSError) and err.__context__ is not None:
        err = err.__context__
    code = getattr(err, "errno", None)
    text = str(err)
    if code == errno.ENOSPC or "No space" in text:
        return "the disk is full"
    if code == errno.EFBIG or "File too large" in text:
        return "the file is larger than allowed (file size limit)"
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "permission denied"
    return text.splitlines()[0] if text else type(err).__name__


class OutDirLock:
    """An exclusive lock on an out dir, so two runs never write into one. The OS drops it when the process dies."""

    def __init__(self, out_dir: Path, command: str = "training", flag: str = "--out-dir"):
        self.path, self.command, self.flag = out_dir / LOCK_NAME, command, flag
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise OutDirError(
                f"{self.path.parent} is in use by a running {self.command} (pid {owner}); wait for it, stop it, "
                f"or use another {self.flag}"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
