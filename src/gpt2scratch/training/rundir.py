"""A run's out dir: where its files go, which snapshots it holds, retention, and the checks made before a run writes
into it (the lock that keeps a second run out is ``files.OutDirLock``).

Layout, as the original script had it (by default the out dir is the directory the command runs in):
``snapshots/snapshot_step_N.pt`` (under --parallel fsdp, the directory ``snapshots/snapshot_step_N/``),
``final_model.pt`` and ``metrics.jsonl`` in the out dir itself, the token cache in ``token_cache/``, and a hidden
``.gpt2scratch.lock`` held by the run in progress. Beside them, what watching a run adds: ``loss.png``, its curves
drawn when it ends (if matplotlib is installed), and with ``--tensorboard`` the event files in ``tensorboard/``.
Nothing else is written there.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from gpt2scratch.checkpoint.load import read_state
from gpt2scratch.checkpoint.sharded import remove_snapshot
from gpt2scratch.errors import CheckpointError, OutDirError

log = logging.getLogger(__name__)

SNAPSHOT_DIR = "snapshots"
FINAL_NAME = "final_model.pt"
METRICS_NAME = "metrics.jsonl"
PLOT_NAME = "loss.png"
TENSORBOARD_DIR = "tensorboard"
CACHE_DIR = "token_cache"

_SNAPSHOT_RE = re.compile(r"snapshot_step_(\d+)(\.pt)?")


def snapshot_path(out_dir: Path, step: int, sharded: bool = False) -> Path:
    """A single-file snapshot's path, or a sharded one's (a directory)."""
    return out_dir / SNAPSHOT_DIR / (f"snapshot_step_{step}" if sharded else f"snapshot_step_{step}.pt")


def list_snapshots(out_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every snapshot under ``out_dir``, files and sharded directories, oldest first. Temporary
    files and directories are not snapshots."""
    folder = out_dir / SNAPSHOT_DIR
    if not folder.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in folder.iterdir()
        if (m := _SNAPSHOT_RE.fullmatch(p.name)) and (m.group(2) or p.is_dir())
    ]
    return sorted(found)


def latest_snapshot(out_dir: Path, weights: bool = True) -> tuple[Path, dict[str, Any]]:
    """The newest snapshot in ``out_dir`` that loads, and its contents (``weights`` False: a sharded one's without
    its model and optimizer states, see ``read_state``); CheckpointError if there is none."""
    damaged = []
    for _, path in reversed(list_snapshots(out_dir)):
        try:
            return path, read_state(path, weights)
        except CheckpointError as err:
            log.warning("skipping %s: %s", path, err)
            damaged.append(path.name)
    folder, final = out_dir / SNAPSHOT_DIR, out_dir / FINAL_NAME
    finished = (
        f"continue the finished run with --resume {final} and a lower --target-loss, or " if final.exists() else ""
    )
    if damaged:
        names = ", ".join(damaged[:3]) + (f" and {len(damaged) - 3} more" if len(damaged) > 3 else "")
        raise CheckpointError(
            f"--resume auto: no snapshot in {folder} loads ({names}: damaged, see above); resume from a copy you "
            f"trust with --resume PATH, {finished}start afresh with another --out-dir"
        )
    if final.exists():
        raise CheckpointError(
            f"--resume auto: no snapshot in {folder}, only the finished run's {final}; continue "
            f"it with --resume {final} and a lower --target-loss, or start afresh with another --out-dir"
        )
    raise CheckpointError(f"--resume auto: no snapshot in {folder}; start without --resume")


def prune(out_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` snapshots (``keep`` 0 keeps all)."""
    if keep <= 0:
        return
    for _, path in list_snapshots(out_dir)[:-keep]:
        if path.is_dir():
            remove_snapshot(path)
        else:
            path.unlink(missing_ok=True)


def remove_temporaries(out_dir: Path, pid: int | str = "*") -> None:
    """Delete our temporary files (``.NAME.tmp-PID``) in ``out_dir``: those a run killed mid-write left, or with
    ``pid`` only that process's (a run exiting at once). Only ours: the out dir may be the user's working directory."""
    patterns = [(out_dir, f".{FINAL_NAME}.tmp-{pid}"), (out_dir / SNAPSHOT_DIR, f".snapshot_step_*.tmp-{pid}")]
    patterns.append((out_dir, f".{PLOT_NAME}.tmp-{pid}"))
    patterns.append((out_dir / CACHE_DIR, f".*.tmp-{pid}"))
    for folder, pattern in patterns:
        if folder.is_dir():
            for path in folder.glob(pattern):
                if path.is_dir():  # a sharded snapshot's
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)


def check_writable(out_dir: Path) -> None:
    """OutDirError unless ``out_dir`` can be created and written, and each name a run writes there is free or of
    the right kind (a file named ``snapshots`` would otherwise fail the first snapshot, many steps later)."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise OutDirError(f"cannot write to --out-dir {out_dir}: {err.strerror or err}") from None
    for name in (SNAPSHOT_DIR, CACHE_DIR, TENSORBOARD_DIR, FINAL_NAME, METRICS_NAME, PLOT_NAME):
        path = out_dir / name
        folder = "." not in name
        if not os.path.lexists(path) or (path.is_dir() if folder else path.is_file()):
            continue
        kind = "a directory" if folder else "a regular file"
        raise OutDirError(f"{path} is in the way: a run writes {kind} there; move it away or use another --out-dir")


def _place(out_dir: Path) -> str:
    return "this directory" if out_dir.resolve() == Path.cwd() else str(out_dir)


def refuse_to_overwrite(out_dir: Path, plot: bool = True) -> None:
    """OutDirError if a fresh run would write over (and prune away) the results of an earlier run: its snapshots,
    its final model, or (for a run that saved neither) its metrics and, if this run draws one, its ``loss.png``."""
    snapshots = [p.name for _, p in list_snapshots(out_dir)]
    final = out_dir / FINAL_NAME
    if snapshots or final.exists():
        found = ", ".join(([FINAL_NAME] if final.exists() else []) + snapshots[-1:])
        if snapshots:
            how = "continue it with --resume auto, or start afresh with another --out-dir"
        else:
            how = f"start afresh with another --out-dir, or continue it with --resume {final} and a lower --target-loss"
        raise OutDirError(
            f"{_place(out_dir)} already holds an earlier run ({found}); {how} (or move its {SNAPSHOT_DIR}/ and "
            f"{FINAL_NAME} away)"
        )
    metrics, picture = out_dir / METRICS_NAME, out_dir / PLOT_NAME
    left = [METRICS_NAME] if metrics.is_file() and metrics.stat().st_size else []
    left += [PLOT_NAME] if plot and os.path.lexists(picture) else []
    if left:
        them = "them" if len(left) > 1 else "it"
        raise OutDirError(
            f"{_place(out_dir)} already holds {' and '.join(left)} of an earlier run (one that saved no snapshot), "
            f"which a fresh run would overwrite; move {them} away or use another --out-dir"
        )


def refuse_to_resume_over(out_dir: Path, source: Path, step: int) -> None:
    """OutDirError if continuing ``source`` (at ``step``) in ``out_dir`` would truncate or prune files that are not
    its own past: another run's, or later ones of its own run (their snapshots count as newer and would be pruned).
    """
    snapshots = list_snapshots(out_dir)
    final, metrics = out_dir / FINAL_NAME, out_dir / METRICS_NAME
    found = ([FINAL_NAME] if final.exists() else []) + [p.name for _, p in snapshots[-1:]]
    found += [METRICS_NAME] if metrics.exists() and metrics.stat().st_size else []
    if not found:
        return
    source = source.resolve()
    own = source.parent == (out_dir / SNAPSHOT_DIR).resolve() or source == final.resolve()
    if not own:
        raise OutDirError(
            f"{_place(out_dir)} holds another run ({', '.join(found)}) that resuming {source.name} there would "
            "overwrite; resume into an empty --out-dir, or continue that run with --resume auto"
        )
    later = [p.name for s, p in snapshots if s > step]
    if later or (final.exists() and source != final.resolve()):
        newer = later[-1] if later else FINAL_NAME
        raise OutDirError(
            f"{_place(out_dir)} holds a later point of this run ({newer}) that resuming step {step} there would "
            "prune or replace; resume into another --out-dir, or continue from the newest with --resume auto"
        )
