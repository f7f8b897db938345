"""Checkpoint files: atomic writes, background snapshots, retention, discovery, safe loading and the out-dir lock.

A checkpoint is a plain dict of tensors and Python values (never pickled classes), so every load goes through
``torch.load(weights_only=True)``: a file crafted to run code when unpickled is refused, not executed. Writes go to a
hidden temporary file in the same directory, are fsync'ed and then renamed into place, so a crash never leaves a
half-written file under a final name; old snapshots are deleted only after the new one is in place.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import logging
import os
import pickle
import re
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, cast

import torch

from .errors import CheckpointError, OutDirError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SNAPSHOT_DIR = "snapshots"
FINAL_NAME = "final_model.pt"
_SNAPSHOT_RE = re.compile(r"snapshot_step_(\d+)\.pt")
_ALIGN = 4096  # O_DIRECT wants buffers, offsets and lengths aligned to the disk's block (4096 covers all)
_CHUNK = 64 << 20  # bytes per write() call


def snapshot_path(out_dir: Path, step: int) -> Path:
    return out_dir / SNAPSHOT_DIR / f"snapshot_step_{step}.pt"


def list_snapshots(out_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every snapshot under ``out_dir``, oldest first. Temporary files are not snapshots."""
    folder = out_dir / SNAPSHOT_DIR
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _SNAPSHOT_RE.fullmatch(p.name))]
    return sorted(found)


def find_latest(out_dir: Path) -> Path:
    """The newest snapshot in ``out_dir`` that loads; CheckpointError if there is none."""
    for _, path in reversed(list_snapshots(out_dir)):
        try:
            load(path)
        except CheckpointError as err:
            log.warning("skipping %s: %s", path, err)
            continue
        return path
    raise CheckpointError(f"--resume auto: no snapshot in {out_dir / SNAPSHOT_DIR}; start without --resume")


def prune(out_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` snapshots (``keep`` 0 keeps all)."""
    if keep <= 0:
        return
    for _, path in list_snapshots(out_dir)[:-keep]:
        path.unlink(missing_ok=True)


def remove_stale_temporaries(out_dir: Path) -> None:
    """Delete temporary files left by a run that was killed mid-write."""
    for folder in (out_dir, out_dir / SNAPSHOT_DIR):
        if folder.is_dir():
            for path in folder.glob(".*.tmp-*"):
                path.unlink(missing_ok=True)


def state_nbytes(state: Any) -> int:
    """Bytes of tensor data in a nested checkpoint dict: a floor for its size on disk."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_nbytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_nbytes(v) for v in state)
    return 0


def check_free_space(folder: Path, needed: int) -> None:
    """OutDirError, with both figures, if ``folder``'s disk has less than ``needed`` bytes (plus 5%) free."""
    free = shutil.disk_usage(folder).free
    if free < needed * 1.05:
        raise OutDirError(
            f"not enough disk space in {folder}: a checkpoint needs {needed / 1e9:.2f} GB, {free / 1e9:.2f} GB free; "
            "free some space, lower --keep-snapshots or use another --out-dir"
        )


def _replace_atomically(path: Path, nbytes: int, write: Callable[[Path], None]) -> None:
    """Have ``write`` fill a temporary file beside ``path`` (and fsync it), then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    check_free_space(path.parent, nbytes)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        tmp.unlink(missing_ok=True)
        raise OutDirError(f"could not write {path}: {_why(err)}; the previous files are intact") from err
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class SerializedState(io.RawIOBase):
    """A checkpoint serialized in memory: a page-aligned, growable file that ``torch.save`` writes into.

    Serializing is the staging copy of a background snapshot (after it, training may change the tensors), and the
    buffer is kept for the next snapshot, since faulting in 1.5 GB of fresh pages costs more than the copy itself.
    Being page-aligned, it can be written with O_DIRECT (``write_file``).
    """

    def __init__(self) -> None:
        super().__init__()
        self._storage: torch.Tensor | None = None  # owns the memory
        self._map: memoryview | None = None  # its page-aligned part
        self.size = 0

    def fill(self, state: Any, capacity: int, checksums: bool = False) -> None:
        """Serialize ``state``, expecting about ``capacity`` bytes; with torch's per-record CRC-32s if ``checksums``."""
        if self._map is None or len(self._map) < capacity:
            self._allocate(capacity)
        self.size = 0
        with _crc32(checksums):
            torch.save(state, cast("IO[bytes]", self))

    def _allocate(self, capacity: int, keep: int = 0) -> None:
        capacity = _round_up(capacity)
        # From torch's allocator, i.e. the heap: memory that training freed is reused before fresh pages are faulted
        # in (see device.keep_freed_memory), which on a VM is what makes a first snapshot slow.
        storage = torch.empty(capacity + _ALIGN, dtype=torch.uint8)
        start = -storage.data_ptr() % _ALIGN
        new = storage.numpy().data[start : start + capacity]
        if self._map is not None:
            new[:keep] = self._map[:keep]
        self._storage, self._map = storage, new

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        end = self.size + view.nbytes
        if self._map is None or end > len(self._map):
            self._allocate(max(end, 2 * self.size), keep=self.size)
        assert self._map is not None
        self._map[self.size : end] = view
        self.size = end
        return view.nbytes

    def tell(self) -> int:
        return self.size

    def write_file(self, tmp: Path) -> None:
        """Write the serialized bytes to ``tmp`` and fsync it, bypassing the page cache where the OS allows.

        With O_DIRECT the disk reads the buffer itself; through the page cache the kernel copies every byte, which
        on a small VM costs more CPU than the training step it competes with. Filesystems that refuse O_DIRECT
        (tmpfs, some network mounts) get ordinary writes.
        """
        assert self._map is not None
        direct = getattr(os, "O_DIRECT", 0)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        try:
            fd = os.open(tmp, flags | direct, 0o644)
        except OSError as err:
            if not direct or err.errno != errno.EINVAL:
                raise
            fd, direct = os.open(tmp, flags, 0o644), 0
        try:
            end = _round_up(self.size) if direct else self.size  # O_DIRECT writes whole blocks
            offset = 0
            while offset < end:
                try:
                    written = os.write(fd, self._map[offset : min(end, offset + _CHUNK)])
                except OSError as err:
                    if not direct or err.errno != errno.EINVAL:
                        raise
                    written = 0
                if written == 0 and not direct:
                    raise OSError(errno.EIO, "the disk accepted no bytes")
                offset += written
                if direct and (written == 0 or offset % _ALIGN):  # refused or short: go on through the cache
                    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~direct)
                    direct, end = 0, self.size
            os.ftruncate(fd, self.size)  # drop the padding of the last block
            os.fsync(fd)
        finally:
            os.close(fd)

    def release(self) -> None:
        self._storage = self._map = None


def _round_up(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


@contextlib.contextmanager
def _crc32(enabled: bool) -> Iterator[None]:
    """torch.save's CRC-32 option, set for one save and put back afterwards."""
    before = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(enabled)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(before)


def _why(err: BaseException) -> str:
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


def on_cpu(state: Any, copies: dict[tuple, torch.Tensor] | None = None) -> Any:
    """``state`` with its tensors on the CPU, as checkpoint files hold them; tensors sharing memory stay shared."""
    copies = {} if copies is None else copies
    if isinstance(state, torch.Tensor):
        if state.device.type == "cpu":
            return state
        key = (state.data_ptr(), state.dtype, tuple(state.shape), state.stride())
        if key not in copies:
            copies[key] = state.detach().to("cpu")
        return copies[key]
    if isinstance(state, dict):
        return {k: on_cpu(v, copies) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        moved = [on_cpu(v, copies) for v in state]
        return moved if isinstance(state, list) else tuple(moved)
    return state


class SnapshotWriter:
    """Writes snapshots on a background thread, one at a time, so training does not wait for the disk.

    ``submit`` serializes the state into memory before returning (training may change the tensors afterwards); if
    the previous write is still going it waits for it first, so two writes never race. A failed write is raised by
    the next ``submit`` or ``wait``.
    """

    def __init__(self, out_dir: Path, keep: int):
        self.out_dir = out_dir
        self.keep = keep
        self._thread: threading.Thread | None = None
        self._buffer = SerializedState()
        self._error: BaseException | None = None

    def submit(self, state: dict[str, Any], path: Path, background: bool = True, checksums: bool = False) -> None:
        """Serialize ``state`` now and write it to ``path`` (in the background unless ``background`` is False).

        ``checksums``: torch's CRC-32 of every record, worth its CPU time for a final model kept for long, not for
        periodic snapshots that are replaced within minutes.
        """
        self.wait()
        path.parent.mkdir(parents=True, exist_ok=True)
        nbytes = state_nbytes(state)
        check_free_space(path.parent, nbytes)  # fail now, not ten steps later
        try:
            self._buffer.fill(on_cpu(state), nbytes + nbytes // 64 + (1 << 20), checksums)  # + the pickle and zip
        except (RuntimeError, MemoryError) as err:
            raise OutDirError(f"could not serialize {path.name} in memory ({_why(err)}); nothing was written") from err
        if not background:
            self._write(path, nbytes)
            self.wait()
            return
        self._thread = threading.Thread(target=self._write, args=(path, nbytes), name="snapshot-writer", daemon=True)
        self._thread.start()

    def _write(self, path: Path, nbytes: int) -> None:
        try:
            _replace_atomically(path, nbytes, self._buffer.write_file)
            prune(self.out_dir, self.keep)
        except BaseException as err:  # handed to the training thread by wait()
            self._error = err

    def wait(self) -> None:
        """Block until the write in flight (if any) is on disk; raise its error if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def close(self) -> None:
        """Wait for the last write and free the serialization buffer."""
        try:
            self.wait()
        finally:
            self._buffer.release()


def load(path: str | Path) -> dict[str, Any]:
    """A checkpoint of ours, loaded without running any code from it.

    Raises CheckpointError if the file is missing, truncated, corrupt, unsafe, foreign or of an unknown version.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a checkpoint file")
    state = load_tensors_file(path)
    if not isinstance(state, dict) or "model_state_dict" not in state:
        raise CheckpointError(f"{path} is not a gpt2-scratch checkpoint (no model_state_dict)")
    version = state.get("format_version")
    if not isinstance(version, int):
        raise CheckpointError(f"{path} is not a gpt2-scratch checkpoint (no format_version)")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {version}, newer than this gpt2-scratch reads ({FORMAT_VERSION}); upgrade"
        )
    if not isinstance(state.get("config"), dict):
        raise CheckpointError(f"{path} has no model config; it is not a complete gpt2-scratch checkpoint")
    return state


RESUME_KEYS = ("model_state_dict", "optimizer_state_dict", "step", "loss", "rng", "loader")


def load_resumable(path: str | Path) -> dict[str, Any]:
    """A checkpoint that holds everything needed to continue training from it."""
    state = load(path)
    missing = [key for key in RESUME_KEYS if key not in state]
    if missing:
        raise CheckpointError(
            f"{path} lacks {', '.join(missing)}, so training cannot resume from it; use --init-from to start from "
            "its weights instead"
        )
    return state


def load_tensors_file(path: Path) -> Any:
    """``torch.load`` with ``weights_only=True`` on the CPU, its failures turned into one-line CheckpointErrors."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "GLOBAL" in str(err) or _starts_like_a_pickle(path):  # real pickled objects: loading could run code
            raise CheckpointError(
                f"refused to load {path}: it contains Python objects other than tensors and plain values, "
                "which could run code; only load files you trust with other tools"
            ) from None
        raise CheckpointError(f"{path} is corrupt or not a checkpoint (torch's safe loader cannot read it)") from None
    except Exception as err:  # on garbage, torch's unpickler also raises IndexError, KeyError, TypeError, ...
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"{path} is truncated or corrupt ({type(err).__name__}: {reason[:120]})") from None


def _starts_like_a_pickle(path: Path) -> bool:
    """Whether the file begins with a pickle's PROTO opcode (protocol 2 to 5), as random bytes almost never do."""
    with open(path, "rb") as f:
        head = f.read(2)
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5


class OutDirLock:
    """An exclusive lock on an out dir, so two runs never write into one. The OS drops it when the process dies."""

    def __init__(self, out_dir: Path):
        self.path = out_dir / ".lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise OutDirError(
                f"{self.path.parent} is in use by a running training (pid {owner}); wait for it, stop it, "
                "or use another --out-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
