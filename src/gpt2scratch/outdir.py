"""A run's out dir: where its files go, which snapshots it holds, retention, the lock, and the checks made before a
run writes into it.

Layout: ``snapshots/snapshot_step_N.pt``, ``final_model.pt`` and ``metrics.jsonl`` in the out dir itself, the token
cache in ``cache/``, and a hidden ``.lock`` held by the run in progress.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
from pathlib import Path
from typing import Any

from .checkpoint import read_checkpoint
from .errors import CheckpointError, OutDirError

log = logging.getLogger(__name__)

SNAPSHOT_DIR = "snapshots"
FINAL_NAME = "final_model.pt"
METRICS_NAME = "metrics.jsonl"
CACHE_DIR = "cache"
_SNAPSHOT_RE = re.compile(r"snapshot_step_(\d+)\.pt")


def snapshot_path(out_dir: Path, step: int) -> Path:
    return out_dir / SNAPSHOT_DIR / f"snapshot_step_{step}.pt"


def list_snapshots(out_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every snapshot under ``out_dir``, oldest first. Temporary files are not snapshots."""
    folder = out_dir / SNAPSHOT_DIR
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _SNAPSHOT_RE.fullmatch(p.name))]
    return sorted(found)


def latest_snapshot(out_dir: Path) -> tuple[Path, dict[str, Any]]:
    """The newest snapshot in ``out_dir`` that loads, and its contents; CheckpointError if there is none."""
    for _, path in reversed(list_snapshots(out_dir)):
        try:
            return path, read_checkpoint(path)
        except CheckpointError as err:
            log.warning("skipping %s: %s", path, err)
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


def check_writable(out_dir: Path) -> None:
    """OutDirError unless ``out_dir`` can be created and written."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise OutDirError(f"cannot write to --out-dir {out_dir}: {err.strerror or err}") from None


def refuse_to_overwrite(out_dir: Path) -> None:
    """OutDirError if a fresh run would write over (and prune away) the results of an earlier run."""
    earlier = [p.name for p in (out_dir / FINAL_NAME,) if p.exists()]
    earlier += [p.name for _, p in list_snapshots(out_dir)]
    if earlier:
        raise OutDirError(
            f"{out_dir} already holds an earlier run ({', '.join(earlier[-2:])}); continue it with --resume auto, "
            "or start afresh with another --out-dir (or delete that one)"
        )


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
