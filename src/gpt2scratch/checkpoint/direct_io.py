"""A page-aligned in-memory file, written to disk with ``O_DIRECT``: the staging buffer of background snapshots.

``torch.save`` serializes a checkpoint into an ``AlignedBuffer`` (after that, training may change the tensors), and a
background thread writes the buffer to disk. Being page-aligned, the buffer can be written with ``O_DIRECT``: the
disk reads it itself, whereas through the page cache the kernel copies every byte, which on a small VM costs more CPU
than the training step it competes with. The buffer is kept for the next snapshot, since faulting in gigabytes of
fresh pages costs more than the copy itself.
"""

from __future__ import annotations

import errno
import fcntl
import io
import os
from pathlib import Path
from typing import Any

import torch

ALIGN = 4096  # O_DIRECT wants buffers, offsets and lengths aligned to the disk's block (4096 covers all)
CHUNK = 64 << 20  # bytes per write() call


def round_up(n: int) -> int:
    """``n`` rounded up to a whole number of blocks."""
    return -(-n // ALIGN) * ALIGN


class AlignedBuffer(io.RawIOBase):
    """A growable, page-aligned, write-only file in memory; ``size`` bytes of it are valid."""

    def __init__(self) -> None:
        super().__init__()
        self._storage: torch.Tensor | None = None  # owns the memory
        self._map: memoryview | None = None  # its page-aligned part
        self.size = 0

    def reset(self, capacity: int) -> None:
        """Empty the buffer, making room for about ``capacity`` bytes."""
        if self._map is None or len(self._map) < capacity:
            self._allocate(capacity)
        self.size = 0

    def _allocate(self, capacity: int, keep: int = 0) -> None:
        capacity = round_up(capacity)
        # From torch's allocator, i.e. the heap: memory that training freed is reused before fresh pages are faulted
        # in (see device.keep_freed_memory), which on a VM is what makes a first snapshot slow.
        storage = torch.empty(capacity + ALIGN, dtype=torch.uint8)
        start = -storage.data_ptr() % ALIGN
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

    def write_to(self, path: Path) -> None:
        """Write the valid bytes to ``path`` and fsync it, bypassing the page cache where the OS allows.

        Filesystems that refuse O_DIRECT (tmpfs, some network mounts) get ordinary writes.
        """
        assert self._map is not None
        direct = getattr(os, "O_DIRECT", 0)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        try:
            fd = os.open(path, flags | direct, 0o644)
        except OSError as err:
            if not direct or err.errno != errno.EINVAL:
                raise
            fd, direct = os.open(path, flags, 0o644), 0
        try:
            end = round_up(self.size) if direct else self.size  # O_DIRECT writes whole blocks
            offset = 0
            while offset < end:
                try:
                    written = os.write(fd, self._map[offset : min(end, offset + CHUNK)])
                except OSError as err:
                    if not direct or err.errno != errno.EINVAL:
                        raise
                    written = 0
                if written == 0 and not direct:
                    raise OSError(errno.EIO, "the disk accepted no bytes")
                offset += written
                if direct and (written == 0 or offset % ALIGN):  # refused or short: go on through the cache
                    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~direct)
                    direct, end = 0, self.size
            os.ftruncate(fd, self.size)  # drop the padding of the last block
            os.fsync(fd)
        finally:
            os.close(fd)

    def release(self) -> None:
        """Give the memory back (the buffer can be reset and used again)."""
        self._storage = self._map = None
